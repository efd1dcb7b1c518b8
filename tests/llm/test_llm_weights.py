"""llm.weights: a LoRA adapter merged into its base, cached by the adapter's content; the service's job weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llm.engine import GenerationConfig
from llm.prompts import PromptConfig
from llm.scoring import ScoringSpec
from llm.weights import adapter_digest, merged_model
from rundir.reader import LLMSpec
from service.engines import served_jobs
from service.settings import Settings


def test_merged_model_is_the_adapted_model_and_is_made_once(
    tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = merged_model(tiny_llm_dir, tiny_lora_dir, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = merged_model(tiny_llm_dir, tiny_lora_dir, tmp_path)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not merged again

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tiny_lora_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter is in the weights

    # a changed adapter is a new folder
    changed = tmp_path / "changed"
    shutil.copytree(tiny_lora_dir, changed)
    (changed / "README.md").write_text("retrained\n")
    assert adapter_digest(changed) != adapter_digest(tiny_lora_dir)
    assert merged_model(tiny_llm_dir, changed, tmp_path) != first


def _spec(base: Path, adapter: Path, weight: float) -> LLMSpec:
    return LLMSpec(
        base_model=str(base),
        adapters={"preference": adapter, "rerank": adapter},
        prompt=PromptConfig(),
        rerank_k=4,
        preference_generation=GenerationConfig(),
        scoring=ScoringSpec(weight=weight),
    )


@pytest.mark.parametrize(
    ("weight", "override", "jobs"),
    [
        (0.0, None, ["preference"]),
        (0.0, 1.0, ["preference", "rerank"]),
        (0.5, None, ["preference", "rerank"]),
        (0.5, 0.0, ["preference"]),
    ],
)
def test_served_jobs_start_the_rerank_job_only_when_the_llm_scores(
    tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path: Path, weight: float, override: float | None, jobs: list[str]
) -> None:
    settings = Settings(run_dir=tmp_path, model_cache=tmp_path / "cache", fusion_weight=override, llm_adapters="lora")
    got = served_jobs(settings, _spec(tiny_llm_dir, tiny_lora_dir, weight), tiny_llm_dir)
    assert list(got) == jobs
    assert all(w.model == tiny_llm_dir and w.lora == tiny_lora_dir for w in got.values())  # lora: one engine


def test_served_jobs_merge_each_adapter_by_default(tiny_llm_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path, merge_cache=tmp_path / "cache")
    got = served_jobs(settings, _spec(tiny_llm_dir, tiny_lora_dir, 1.0), tiny_llm_dir)
    assert got["rerank"].lora is None and got["rerank"].model.parent == tmp_path / "cache" / "merged"
    assert got["preference"].model == got["rerank"].model  # the same adapter: one merged folder, one engine
