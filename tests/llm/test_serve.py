"""``llm.serve``: the ``vllm serve`` command of an ``EngineConfig`` is the in-process engine's configuration.

vLLM's own parser reads the flags back (``make_arg_parser`` + ``AsyncEngineArgs.from_cli_args``, what the server
does at start), and every keyword the in-process engine is built with comes back equal. No server is started.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from llm.engine import EngineConfig
from llm.serve import SERVER_MODULE, serve_command


def _parsed(argv: list[str]) -> tuple[Any, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert argv[1:3] == ["-m", SERVER_MODULE]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])
    return args, AsyncEngineArgs.from_cli_args(args)


CONFIGS = [  # the model folder is the test's tiny model (vLLM's argument checks read its config)
    EngineConfig(model="-", dtype="bfloat16", block_size=32, max_num_batched_tokens=512, max_num_seqs=16),
    EngineConfig(
        model="-",
        dtype="float32",
        enable_prefix_caching=False,
        enforce_eager=False,
        kv_cache_gib=1.5,
        enable_lora=True,
        max_lora_rank=8,
        seed=7,
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["merged-bf16", "lora-fp32"])
def test_the_server_gets_every_engine_setting(cfg: EngineConfig, tiny_llm_dir: Path) -> None:
    cfg = dataclasses.replace(cfg, model=str(tiny_llm_dir))
    loras = {"rerank-abc": "/runs/v1/adapters/rerank"} if cfg.enable_lora else None
    argv = serve_command(cfg, ["preference-abc"], host="127.0.0.1", port=8123, loras=loras, api_key="secret-key-1")
    args, engine_args = _parsed(argv)
    expected = dataclasses.replace(cfg, log_stats=True).engine_kwargs()
    for key, value in expected.items():
        assert getattr(engine_args, key) == value, key
    assert args.served_model_name == ["preference-abc"]
    assert args.host == "127.0.0.1" and args.port == 8123 and args.api_key == ["secret-key-1"]
    assert args.enable_prompt_tokens_details  # llm.remote reads prefix-cache hits from the usage
    if loras:
        assert [(m.name, m.path) for m in args.lora_modules] == [("rerank-abc", "/runs/v1/adapters/rerank")]


def test_lora_modules_need_a_lora_engine() -> None:
    with pytest.raises(ValueError, match="enable_lora"):
        serve_command(EngineConfig(model="/m"), ["x"], loras={"rerank-abc": "/a"})
