# The two set-up commands of the quick start are `make serve` and `make test`.
# Both install first; the install step is skipped when pyproject.toml has not changed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp
RUN ?= runs/default
# The first run trains in minutes (training/configs/quick.yaml); the whole DPO chain on every user
# (training/configs/chain.yaml) then trains in the background at nice 19 and is rolled out live when it lands
# (BACKGROUND_CONFIG=default for the run without DPO, BACKGROUND_CONFIG= to skip it).
CONFIG ?= quick
BACKGROUND_CONFIG ?= chain
HOST ?= 127.0.0.1
PORT ?= 8000
# `python -m dpo4rec`, not the `dpo4rec` console script: on pyenv a script pip has just installed is not
# on PATH until `pyenv rehash`, and the quick start runs right after the install.
DPO4REC := $(PYTHON) -m dpo4rec
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false

.PHONY: install test serve run lint bench quickstart-check

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q

run: install
	@test -L $(RUN)/current -o -f $(RUN)/manifest.json || $(DPO4REC) train --config $(CONFIG) --out $(RUN) --root

serve: run
	$(DPO4REC) serve --run $(RUN) --host $(HOST) --port $(PORT) \
	  $(if $(BACKGROUND_CONFIG),--train-in-background $(BACKGROUND_CONFIG))

# What CI runs after the suite: the quick start as a user types it, on a tiny run (scripts/quickstart_check.sh).
quickstart-check: install
	bash scripts/quickstart_check.sh

lint: install
	ruff check . && ruff format --check . && mypy
