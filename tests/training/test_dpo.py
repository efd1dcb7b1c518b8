"""training.dpo: TRL DPO + PEFT LoRA on the tiny LLM, smoke-run TRL-style: the preference is learnt
(rewards/margins rise, rewards/accuracies reach 1), the LoRA weights moved, the adapter and the merged
model are what vLLM and transformers load. Curves are read from the trainer's log history; nothing
asserts on wall-clock time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llm.weights import merge_adapter
from training.dpo import (
    DPOTrainConfig,
    SFTTrainConfig,
    TrainResult,
    curves,
    dpo_dataset_rows,
    train_dpo,
)
from training.pairs import PairSet, PairStats

STEPS = 8


def synthetic_pairs(n: int = 4) -> PairSet:
    """A consistent preference: chosen always says comedy, rejected horror."""
    rows = []
    for i in range(n):
        prompt = [
            {"role": "system", "content": "Describe the user's tastes."},
            {"role": "user", "content": f"User {i} watched Film {i} and Film {i + 1}."},
        ]
        rows.append(
            {
                "user_id": f"u{i}",
                "prompt": prompt,
                "chosen": "Loves comedy films.",
                "rejected": "Loves horror films.",
                "reward_chosen": 1.0,
                "reward_rejected": 0.0,
            }
        )
    return PairSet(rows=rows, stats=PairStats(users=n, kept=n))


@pytest.fixture(scope="module")
def dpo_run(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    # lr and beta far above the paper's (beta=0.01) so a few steps on a random tiny model show the trend
    cfg = DPOTrainConfig(
        learning_rate=1e-3,
        beta=0.1,
        max_steps=STEPS,
        batch_size=4,
        grad_accum=1,
        warmup=0,
        lr_scheduler="constant",
        max_length=128,
        max_prompt_length=96,
        lora_r=8,
        lora_alpha=16,
    )
    return train_dpo(tiny_llm_dir, synthetic_pairs(), cfg, tmp_path_factory.mktemp("dpo"), progress=False)


def test_dpo_learns_the_preference(dpo_run: TrainResult) -> None:
    c = dpo_run.curves
    assert c["step"] == [float(s) for s in range(1, STEPS + 1)]
    # step 1: the zero-initialised LoRA B makes policy == reference: margin 0, loss log 2
    assert c["rewards/margins"][0] == pytest.approx(0.0, abs=1e-6)
    assert c["loss"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert c["rewards/margins"][-1] > c["rewards/margins"][0] + 0.01
    assert np.all(np.diff(c["rewards/margins"][1:]) > -0.01)  # rises (allowing for float noise)
    assert c["rewards/accuracies"][-1] == 1.0
    assert c["rewards/chosen"][-1] > c["rewards/rejected"][-1]
    assert c["loss"][-1] < c["loss"][0]
    assert dpo_run.examples == 4 and dpo_run.dropped_long == 0 and dpo_run.tokens > 0


def test_dpo_moves_only_the_lora_weights_and_saves_a_peft_adapter(dpo_run: TrainResult, tiny_llm_dir: Path) -> None:
    from safetensors.torch import load_file

    adapter = dpo_run.adapter_dir
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not (adapter / "tokenizer.json").exists()  # vLLM would take it for a LoRA tokenizer
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # "all-linear" resolves to every linear layer but lm_head (PEFT 0.21 saves the full module paths)
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(w) > 0 for w in lora_b)  # PEFT initialises B to zeros
    assert all("lora_" in name for name in weights)  # nothing but adapter weights
    saved = json.loads((adapter.parent / "train_config.json").read_text())
    assert saved["beta"] == 0.1 and saved["lora_r"] == 8
    assert json.loads((adapter.parent / "log_history.json").read_text()) == dpo_run.log_history


def test_merged_model_equals_base_plus_adapter(dpo_run: TrainResult, tiny_llm_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter(tiny_llm_dir, dpo_run.adapter_dir, tmp_path / "merged", dtype="float32")
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # the staging dir is gone
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(dpo_run.adapter_dir)).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileExistsError):
        merge_adapter(tiny_llm_dir, dpo_run.adapter_dir, merged_dir)


def test_long_prompts_are_dropped_not_cut(tiny_llm_dir: Path, tmp_path: Path) -> None:
    pairs = synthetic_pairs(2)
    pairs.rows[1]["prompt"][1]["content"] += " and Film" * 200
    cfg = DPOTrainConfig(max_steps=1, batch_size=1, grad_accum=1, max_length=128, max_prompt_length=96)
    result = train_dpo(tiny_llm_dir, pairs, cfg, tmp_path, progress=False)
    assert result.examples == 1 and result.dropped_long == 1


def test_curves_keep_training_rows_only() -> None:
    history: list[dict[str, Any]] = [
        {"loss": 0.69, "rewards/margins": 0.0, "step": 1},
        {"loss": 0.60, "rewards/margins": 0.2, "step": 2},
        {"train_runtime": 3.0, "train_loss": 0.65, "step": 2},
    ]
    c = curves(history, keys=("loss", "rewards/margins", "rewards/accuracies"))
    assert c["step"] == [1.0, 2.0] and c["loss"] == [0.69, 0.60] and c["rewards/margins"] == [0.0, 0.2]
    assert all(math.isnan(v) for v in c["rewards/accuracies"])


def test_dataset_rows_are_conversational_for_chat_prompts() -> None:
    rows = dpo_dataset_rows(synthetic_pairs(1))
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Loves comedy films."}]
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}
    plain = dpo_dataset_rows([{"prompt": "rendered", "chosen": "a", "rejected": "b"}])
    assert plain == [{"prompt": "rendered", "chosen": "a", "rejected": "b"}]


def test_config_validation() -> None:
    assert DPOTrainConfig().beta == 0.01 and DPOTrainConfig().precompute_ref_log_probs
    with pytest.raises(ValueError, match="beta"):
        DPOTrainConfig(beta=0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        DPOTrainConfig(max_length=128, max_prompt_length=128)
    with pytest.raises(ValueError, match="epochs > 0 or max_steps"):
        SFTTrainConfig(epochs=0)
    assert DPOTrainConfig(lora_target_modules=("q_proj", "v_proj")).lora_target_modules == ["q_proj", "v_proj"]
