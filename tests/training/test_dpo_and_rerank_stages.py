"""The DPO loop and the re-rank stage end to end on tiny data: the tiny random LLM through the real vLLM engine
one DPO round with 2 samples per user and a few DPO steps, then the re-rank job (zero-shot, SFT, SFT+DPO).
Asserts the run directory carries the new rows, comparisons, adapters and plots; nothing about quality
(a random 2-layer LLM) and nothing about wall-clock time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rundir.manifest import verify
from training.config import from_dict, load_config
from training.preference_dpo import aligned_row
from training.rerank_training import COLD, COLD_RETRIEVER, FUSED, RERANK_ROWS, SFT, SFT_DPO
from training.stages import BASE_ROW, sample_users


@pytest.mark.engine
def test_dpo_loop_and_rerank_job_tiny_run(tiny_loop_run) -> None:
    out, doc = tiny_loop_run.out, tiny_loop_run.doc
    required = (
        "llm.json",
        "metrics.json",
        "report.md",
        "stage_ndcg.png",
        "rewards.png",
        "dpo_curves.png",
        "adapters/preference/adapter_config.json",
        "adapters/preference/adapter_model.safetensors",
        "adapters/rerank/adapter_config.json",
        "adapters/rerank/adapter_model.safetensors",
        "dpo/preference_round1_pairs.jsonl",
    )
    verify(out, required=required)
    systems = [r["system"] for r in doc["rows"]]
    cold_rows = [name + COLD for name in RERANK_ROWS]
    assert systems == ["most-popular", "SASRec", BASE_ROW, aligned_row(1), *RERANK_ROWS, COLD_RETRIEVER, *cold_rows]
    for row in doc["rows"]:  # every row on the same 40 users' test items
        assert row["users"] == 40 and 0.0 <= row["NDCG@10"] <= row["Recall@10"] <= 1.0
    pairs = {(c["a"], c["b"]) for c in doc["comparisons"]}
    assert (aligned_row(1), BASE_ROW) in pairs
    # re-ranked vs the served retriever's order: the selection (below) is made before the job builds its lists
    assert {(name, doc["served_retriever"]) for name in RERANK_ROWS} <= pairs
    assert {(name, COLD_RETRIEVER) for name in cold_rows} <= pairs and (SFT_DPO, SFT) in pairs
    for c in doc["comparisons"]:
        assert c["ci_low"] <= c["diff"] <= c["ci_high"] and c["n"] == 40

    # the loop: pairs with chosen above rejected, the DPO curves, the reward check
    (round1,) = doc["dpo_loop"]["rounds"]
    assert round1["pairs"]["kept"] >= 1 and round1["pairs"]["users"] == 40
    dist = doc["reward_distributions"]["round 1"]
    assert all(c > r for c, r in zip(dist["chosen"], dist["rejected"], strict=True))
    assert len(dist["samples"]) == 40 * 2
    assert set(doc["dpo_curves"]) == {"preference round 1", "rerank SFT", "rerank SFT+DPO"}
    assert doc["dpo_curves"]["preference round 1"]["step"] == [1.0, 2.0, 3.0]
    assert "after" in round1["reward_check"]["all_users"]
    # served: the aligned retriever only if it beat plain SASRec on the selection users (not early stopping's)
    selection = doc["selection"]
    assert selection["candidate"] == aligned_row(1) and 0 < selection["users"] < 40
    beat = selection["vs_plain"]["ci_low"] > 0
    assert doc["served_retriever"] == selection["served"] == (aligned_row(1) if beat else "SASRec")

    # the re-rank job: only users whose test item is among the K are scored; the rest keep the retriever rank
    rerank = doc["rerank"]
    assert rerank["k"] == 5 and rerank["train_lists"] == 8 and 0 <= rerank["scored_users"] <= 40
    assert rerank["dpo"]["pairs"] == 16 and rerank["calibration_lists"] == 3  # 2 rejected labels per list
    assert sum(rerank["train_target_labels"]) == 8
    served = next(r for r in doc["rows"] if r["system"] == doc["served_retriever"])
    cold = next(r for r in doc["rows"] if r["system"] == COLD_RETRIEVER)
    for name in RERANK_ROWS:
        for row_name, base in ((name, served), (name + COLD, cold)):
            row = next(r for r in doc["rows"] if r["system"] == row_name)
            assert row["Recall@5"] == pytest.approx(base["Recall@5"])  # re-ordering the top 5 keeps its hits
            assert row["Recall@20"] == pytest.approx(base["Recall@20"])
        if name != FUSED and rerank["scored_users"]:  # how the LLM's order relates to the retriever's
            order = rerank["order"][name]
            assert order["prompts"] == rerank["scored_users"] and -1 <= order["spearman_with_retriever"] <= 1
            assert 1 <= order["target_position_after"] <= 5
    # the label prior and the fusion weight: chosen among the configured weights, saved for the service
    assert set(rerank["top_label"]) == set(RERANK_ROWS) - {FUSED}
    assert all(abs(sum(h) - 1) < 1e-6 for h in rerank["top_label"].values())
    fusion = rerank["fusion"]
    assert fusion["weights"] == [0.0, 0.5, 1.0] and fusion["chosen"] in fusion["weights"]
    assert len(fusion["valid_ndcg10_of_scored"]) == 3

    # the served artifacts: aligned preferences and both adapters, named in llm.json
    llm = json.loads((out / "llm.json").read_text())
    assert llm["adapters"] == {"preference": "adapters/preference", "rerank": "adapters/rerank"}
    assert llm["rerank_k"] == 5 and llm["prompt"]["max_recent"] == 3 and llm["prompt"]["max_history"] == 8
    assert llm["scoring"]["weight"] == fusion["chosen"] and llm["scoring"]["permutations"] == 2
    assert len(llm["scoring"]["log_prior"]) == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fusion_weight"] == fusion["chosen"]
    assert manifest["llm_rerank"] == ("on" if fusion["chosen"] > 0 else "skipped (fusion weight 0)")
    adapter = json.loads((out / "adapters/rerank/adapter_config.json").read_text())
    assert adapter["r"] == 8
    report = (out / "report.md").read_text()
    for name in (aligned_row(1), *RERANK_ROWS):
        assert f"| {name} |" in report
    assert "## Preference DPO loop" in report and "## Re-rank job" in report and "labels.png" in report
    assert (out / "labels.png").is_file()


def test_named_configs_load() -> None:
    for name in ("default", "tiny"):  # the loop is off unless a config turns it on
        cfg = load_config(name)
        assert cfg.preference_dpo.rounds == 0 and not cfg.rerank.enabled
    small = load_config("small")
    assert small.preference_dpo.rounds >= 1 and small.rerank.enabled
    assert small.preference_dpo.max_users is not None and small.preference_dpo.max_users < 943
    paper = load_config("paper")
    p = paper.preference_dpo
    assert (p.rounds, p.samples_per_user, p.train.beta, p.max_users) == (2, 10, 0.01, None)
    assert paper.max_users is None and paper.rerank.enabled and paper.rerank.k == 20
    # nested trainer sections merge into the section's defaults, and overrides reach them
    assert paper.rerank.dpo.beta == 0.1 and paper.rerank.dpo.max_prompt_length == 1000
    cfg = load_config("small", ["preference_dpo.train.beta=0.05", "rerank.k=8"])
    assert cfg.preference_dpo.train.beta == 0.05 and cfg.rerank.k == 8


def test_config_errors_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="samples_per_user"):
        from_dict({"preference_dpo": {"samples_per_user": 1}})
    with pytest.raises(ValueError, match=r"preference_dpo\.train: unknown setting"):
        from_dict({"preference_dpo": {"train": {"betta": 0.1}}})
    with pytest.raises(ValueError, match="beta must be > 0"):
        from_dict({"preference_dpo": {"train": {"beta": 0}}})
    with pytest.raises(ValueError, match=r"rerank\.k"):
        from_dict({"rerank": {"k": 100}})
    with pytest.raises(ValueError, match=r"rerank\.cold_lists must be >= 0"):
        from_dict({"rerank": {"cold_lists": -1}})
    with pytest.raises(ValueError, match="no-LLM control: it needs preference_dpo.rounds=0"):
        from_dict({"llm": {"preference_source": "history"}, "preference_dpo": {"rounds": 1}})
    with pytest.raises(ValueError, match="preference_source must be llm or history"):
        from_dict({"llm": {"preference_source": "bm25"}})


def test_merged_policy_is_a_float32_model_folder(tmp_path: Path, tiny_llm_dir: Path) -> None:
    """llm.engine_adapters=merged (the CPU default): the engine gets base + adapter merged in float32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.dpo import ADAPTER_DIR
    from training.engines import EngineWeights, policy

    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "rerank_sft" / ADAPTER_DIR
    lora.save_pretrained(str(adapter))
    expected = lora.merge_and_unload().state_dict()
    cfg = from_dict({"llm": {"model": str(tiny_llm_dir)}})
    assert policy(cfg, tiny_llm_dir, None, tmp_path) == EngineWeights(str(tiny_llm_dir), None)
    got = policy(cfg, tiny_llm_dir, adapter, tmp_path)
    assert got.lora is None and got.model != str(tiny_llm_dir)
    merged = AutoModelForCausalLM.from_pretrained(got.model)
    assert merged.dtype == torch.float32  # a bf16 merge would round a small LoRA update away
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged.state_dict()[name], expected[name])
    assert policy(cfg, tiny_llm_dir, adapter, tmp_path) == got  # merged once, reused
    lora_cfg = from_dict({"llm": {"model": str(tiny_llm_dir), "engine_adapters": "lora"}})
    assert policy(lora_cfg, tiny_llm_dir, adapter, tmp_path) == EngineWeights(str(tiny_llm_dir), str(adapter))


def test_sample_users_is_seeded_and_keeps_order() -> None:
    users = [f"u{i}" for i in range(50)]
    picked = sample_users(users, 10, seed=3)
    assert len(picked) == 10 and picked == sorted(picked, key=users.index)
    assert picked == sample_users(users, 10, seed=3) and picked != sample_users(users, 10, seed=4)
    assert sample_users(users, None, 0) == users and sample_users(users, 80, 0) == users
