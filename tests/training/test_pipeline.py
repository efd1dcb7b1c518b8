"""End to end: a tiny generated data set, a tiny random LLM through the real vLLM engine, a complete
run directory that verifies."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from retrieval.rundir import RunDirError, verify, write_manifest
from training.config import from_dict
from training.pipeline import reuse_preferences, run_pipeline
from training.preferences import save_preferences

GENRES = ["Comedy", "Drama", "Horror", "Sci-Fi", "Romance"]


def write_tiny_dataset(folder, users=40, items=80, seed=0):
    """RecBole atomic files where each user mostly watches one genre, in a time order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tiny.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(1, items + 1):
            f.write(f"{i}\tMovie {i}\t{1980 + i % 30}\t{GENRES[i % len(GENRES)]}\n")
    with open(folder / "tiny.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(users):
            genre = u % len(GENRES)
            liked = [i for i in range(1, items + 1) if i % len(GENRES) == genre]
            picks = rng.sample(liked, 10) + rng.sample(range(1, items + 1), 4)
            for t, item in enumerate(picks):
                f.write(f"u{u}\t{item}\t{rng.randint(1, 5)}\t{1000 + t}\n")
    return folder


@pytest.mark.engine
def test_end_to_end_tiny_run(tmp_path, tiny_llm_dir):
    data = write_tiny_dataset(tmp_path / "tiny")
    cfg = from_dict(
        {
            "data": {"name": str(data), "data_dir": str(tmp_path / "cache")},
            "llm": {"model": str(tiny_llm_dir), "max_tokens": 16, "max_model_len": 1024, "history_items": 8},
            "retriever": {"epochs": 3, "patience": 2, "hidden": 16, "max_len": 12, "adaptor_hidden": 16},
            "eval": {"bootstrap": 50},
        }
    )
    out = tmp_path / "run"
    doc = run_pipeline(cfg, out)
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
    assert systems == ["most-popular", "SASRec", "SASRec + base-LLM preferences"]
    for row in doc["rows"]:
        assert row["users"] == 40 and 0.0 <= row["NDCG@10"] <= row["Recall@10"] <= 1.0
    assert doc["index_recall_at_20_vs_exact"] == pytest.approx(1.0)
    prefs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 40 and all(isinstance(p["text"], str) for p in prefs)
    assert "| SASRec |" in (out / "report.md").read_text()

    # the same chain again on the first run's texts (no LLM stage), with another fusion
    again = replace(cfg, llm=replace(cfg.llm, model="/nonexistent", preferences_from=str(out)))
    again = replace(again, retriever=replace(again.retriever, fusion="add"))
    run_pipeline(again, tmp_path / "again")
    assert (tmp_path / "again" / "preferences.jsonl").read_text() == (out / "preferences.jsonl").read_text()


def test_reused_preferences_must_cover_the_users_and_come_from_training(tmp_path):
    save_preferences(tmp_path, {"u1": "likes comedies", "u2": "likes horror"}, np.zeros((2, 4), np.float32))
    write_manifest(tmp_path, version="v", dataset="d", config={})
    assert reuse_preferences(tmp_path, ["u2"]) == {"u2": "likes horror"}
    with pytest.raises(RunDirError, match="no text for 1 users"):
        reuse_preferences(tmp_path, ["u1", "u3"])
    write_manifest(tmp_path, version="v", dataset="d", config={}, extra={"preferences_refreshed": True})
    with pytest.raises(RunDirError, match="refreshed from full histories"):
        reuse_preferences(tmp_path, ["u1"])
