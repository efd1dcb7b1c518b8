"""Shared session fixtures: the SmolLM2 tokenizer, a tiny random LLM saved locally, and ONE real vLLM engine.

The environment defaults below are set before anything imports vLLM or transformers (pytest loads this
file first). Engine start costs 20-50 s on CPU, so the ``llm_engine`` fixture is session-scoped and
shared by every test that needs generation or label scoring; tests that use it are marked ``engine``
automatically (deselect them with ``-m "not engine"``).

Set ``DPO4REC_TEST_MODEL_CACHE`` to a folder to keep the converted SmolLM2 between sessions.
"""

from __future__ import annotations

import os

from llm.engine import apply_env_defaults  # noqa: E402  (cheap: vLLM is imported lazily)

apply_env_defaults(  # the engine's defaults (llm.engine.ENGINE_ENV_DEFAULTS), and the suite's own
    {
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB per engine: several tiny engines live at once in the suite
        "OMP_NUM_THREADS": "2",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "DPO4REC_API_NICE": "0",  # apps run inside the pytest process: never lower its priority
        "DPO4REC_GC_FREEZE": "false",  # nor freeze its heap: every app of the suite would stay in it
    }
)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import pytest  # noqa: E402

from llm.engine import EngineConfig  # noqa: E402  (cheap: vLLM is imported lazily)

if TYPE_CHECKING:
    from vllm import LLM

# The tiny model: LlamaForCausalLM with the SmolLM2 vocabulary. Head size 32 because vLLM's CPU
# attention supports head sizes 32, 64, 80, ... only (not 16).
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "llm_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``resolve_model`` caches converted models (a session tmp dir unless overridden)."""
    configured = os.environ.get("DPO4REC_TEST_MODEL_CACHE")
    if configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return Path(configured)
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def smollm2_dir(model_cache_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct as a bf16 safetensors folder (converted once: ~30 s)."""
    from llm.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, model_cache_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer (with chat template) extracted from the GGUF, without loading the model."""
    from llm.models import save_tokenizer, smollm2_tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    save_tokenizer(smollm2_tokenizer(), out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny randomly initialised (seed 0) LlamaForCausalLM with the SmolLM2 tokenizer, bf16 safetensors."""
    out = tmp_path_factory.mktemp("tiny-llm")
    build_tiny_llm(out, smollm2_tokenizer_dir)
    return out


def build_tiny_llm(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llm.models import save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA, **ids)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (r=8, seed 0) on the tiny model, with random A and B so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    # init_lora_weights=False: random B as well as A, so the adapter changes the outputs.
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("tiny-lora")
    get_peft_model(model, lora).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_engine_config(tiny_llm_dir: Path) -> EngineConfig:
    """EngineConfig for the tiny model; ``dataclasses.replace`` it for variants."""
    # LoRA on, so adapters trained in the tests are served by this same engine (multi-LoRA).
    return EngineConfig(
        model=str(tiny_llm_dir),
        max_model_len=1024,
        max_num_seqs=16,
        seed=0,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=2,
    )


@pytest.fixture(scope="session")
def llm_engine(tiny_engine_config: EngineConfig) -> Iterator[LLM]:
    """ONE ``vllm.LLM`` on the tiny model for the whole session, shut down at the end."""
    from llm.engine import make_llm, shutdown_llm, warm_up

    llm = make_llm(tiny_engine_config)
    try:
        warm_up(llm)  # the first requests pay one-off set-up costs (seconds): not inside a test
        yield llm
    finally:
        shutdown_llm(llm)
