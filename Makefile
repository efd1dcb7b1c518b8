# The two set-up commands of the quick start are `make serve` and `make test`.
# Both install first; the install step is skipped when pyproject.toml has not changed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp
RUN ?= runs/default
CONFIG ?= default
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false

.PHONY: install test serve run lint bench

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q

run: install
	@test -f $(RUN)/manifest.json || dpo4rec train --config $(CONFIG) --out $(RUN)

serve: run
	dpo4rec serve --run $(RUN)

lint: install
	ruff check . && ruff format --check . && mypy
