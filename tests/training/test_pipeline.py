"""End to end: a tiny generated data set, a tiny random LLM through the real vLLM engine, a complete
run directory that verifies."""

import json
from dataclasses import replace

import numpy as np
import pytest
from tiny import write_tiny_dataset  # same directory

from rundir.manifest import RunDirError, verify, write_manifest
from rundir.preferences import save_preferences
from training.base_preferences import reuse_preferences
from training.config import from_dict
from training.pipeline import run_pipeline


@pytest.mark.engine
def test_end_to_end_tiny_run(tiny_loop_run, tmp_path):
    out, doc = tiny_loop_run.out, tiny_loop_run.doc
    manifest = verify(
        out,
        required=(
            "catalog.jsonl",
            "index.faiss",
            "preferences.jsonl",
            "users.json",
            "llm.json",
            "metrics.json",
            "report.md",
            "systems.png",
        ),
    )
    assert manifest["dataset"] == "tiny"
    systems = [r["system"] for r in doc["rows"]]
    assert systems[:3] == ["most-popular", "SASRec", "SASRec + base-LLM preferences"]
    for row in doc["rows"]:
        assert row["users"] == 40 and 0.0 <= row["NDCG@10"] <= row["Recall@10"] <= 1.0
    assert doc["index_recall_at_20_vs_exact"] == pytest.approx(1.0)
    prefs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 40 and all(isinstance(p["text"], str) for p in prefs)
    assert "| SASRec |" in (out / "report.md").read_text()


@pytest.mark.engine  # its fixture is the tiny run
def test_the_chain_without_the_loop_on_a_runs_texts(tiny_loop_run, tmp_path):
    """The base chain alone (no DPO, no re-rank job) on the texts of a run: no LLM stage at all."""
    cfg = tiny_loop_run.cfg
    again = replace(
        cfg,
        llm=replace(cfg.llm, model="/nonexistent", preferences_from=str(tiny_loop_run.out)),
        retriever=replace(cfg.retriever, fusion="add", epochs=3, patience=2),
        preference_dpo=replace(cfg.preference_dpo, rounds=0),
        rerank=replace(cfg.rerank, enabled=False),
    )
    doc = run_pipeline(again, tmp_path / "again")
    assert [r["system"] for r in doc["rows"]] == ["most-popular", "SASRec", "SASRec + base-LLM preferences"]
    verify(tmp_path / "again", required=("index.faiss", "metrics.json", "report.md", "systems.png"))
    text = (tmp_path / "again" / "preferences.jsonl").read_text()
    assert text == (tiny_loop_run.out / "preferences.jsonl").read_text()


def test_the_no_llm_control_fuses_the_history_lines(tmp_path):
    """llm.preference_source=history: no LLM at all (the model path is never opened); the text of each
    user is the history lines of the preference prompt, and the row says so."""
    data = write_tiny_dataset(tmp_path / "tiny")
    cfg = from_dict(
        {
            "data": {"name": str(data), "data_dir": str(tmp_path / "cache")},
            "llm": {"model": "/nonexistent", "preference_source": "history", "history_items": 4},
            "retriever": {"epochs": 2, "patience": 2, "hidden": 16, "max_len": 12, "adaptor_hidden": 16},
            "eval": {"bootstrap": 50},
        }
    )
    doc = run_pipeline(cfg, tmp_path / "run")
    assert [r["system"] for r in doc["rows"]] == ["most-popular", "SASRec", "SASRec + history text (no LLM)"]
    assert {c["a"] for c in doc["comparisons"]} == {"SASRec + history text (no LLM)", "SASRec"}
    prefs = [json.loads(line) for line in (tmp_path / "run" / "preferences.jsonl").open()]
    assert len(prefs) == 40
    assert all(p["text"].count(" | ") >= 4 and p["text"].count("; ") == 3 for p in prefs)  # 4 items, 2+ fields


def test_reused_preferences_must_cover_the_users_and_come_from_training(tmp_path):
    save_preferences(tmp_path, {"u1": "likes comedies", "u2": "likes horror"}, np.zeros((2, 4), np.float32))
    write_manifest(tmp_path, version="v", dataset="d", config={})
    assert reuse_preferences(tmp_path, ["u2"]) == {"u2": "likes horror"}
    with pytest.raises(RunDirError, match="no text for 1 users"):
        reuse_preferences(tmp_path, ["u1", "u3"])
    write_manifest(tmp_path, version="v", dataset="d", config={}, extra={"preferences_refreshed": True})
    with pytest.raises(RunDirError, match="refreshed from full histories"):
        reuse_preferences(tmp_path, ["u1"])
