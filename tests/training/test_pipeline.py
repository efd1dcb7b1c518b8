"""End to end: a tiny generated data set, a tiny random LLM through the real vLLM engine, a complete
run directory that verifies."""

import json
import random

import pytest

from retrieval.rundir import verify
from training.config import from_dict
from training.pipeline import run_pipeline

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
