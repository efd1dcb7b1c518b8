"""A small synthetic run directory for developing ``service_bench.py`` without a full training run.

Same approach as ``tests/service/support.py``: a synthetic catalog, users with random histories, an
untrained preference-fused SASRec and its FAISS index, preference texts encoded by the real text
encoder; but the LLM is the real SmolLM2-135M-Instruct (``llm.json`` base_model, converted once into
the model cache) with the default re-rank K of 20, so the prompts have realistic lengths.

    python benchmarks/tiny_run.py --out /tmp/bench-dev/tiny [--users 200] [--items 300]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation", "Crime", "War")
WORDS = ("Night", "River", "Star", "Ghost", "Summer", "Iron", "Silent", "Golden", "Last", "Wild", "Dark", "Lost")


def build(out: Path, n_users: int, n_items: int, base_model: str, seed: int = 0) -> Path:
    import numpy as np
    import torch

    from retrieval.catalog import Catalog, Item
    from retrieval.encoder import EncoderConfig, TextEncoder
    from retrieval.index import ItemIndex
    from retrieval.sasrec import SASRec, SASRecConfig
    from rundir.manifest import write_manifest

    rng = random.Random(seed)
    out.mkdir(parents=True)
    items = []
    for i in range(1, n_items + 1):
        year = rng.randint(1950, 1998)
        title = f"The {rng.choice(WORDS)} {rng.choice(WORDS)} of {rng.choice(WORDS)} {i} ({year})"
        items.append(
            Item(item_id=str(i), title=title, genres=tuple(sorted(rng.sample(GENRES, rng.randint(1, 3)))), year=year)
        )
    catalog = Catalog(items)
    catalog.save(out / "catalog.jsonl")
    users = {str(u): rng.sample(range(1, n_items + 1), rng.randint(20, 60)) for u in range(1, n_users + 1)}
    (out / "users.json").write_text(json.dumps(users))
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(num_items=n_items, max_len=50, hidden=64, layers=2, heads=1, dropout=0.0, pref_dim=384))
    model = model.eval()
    model.save(out / "retriever")
    ItemIndex(model.item_vectors()).save(out / "index.faiss")
    encoder_cfg = EncoderConfig()
    (out / "encoder.json").write_text(json.dumps(asdict(encoder_cfg)))
    texts = {}
    for u, hist in users.items():
        genres = sorted({g for i in hist[-10:] for g in catalog[i].genres})
        decade = rng.choice(["50s", "60s", "70s", "80s", "90s"])
        texts[u] = (
            f"This user enjoys {', '.join(genres[:3])} films from the {decade}, "
            "with a taste for character-driven stories, tense atmosphere and memorable endings; light on romance, "
            "open to older classics and to ambitious genre films for adult audiences."
        )
    vectors = TextEncoder(encoder_cfg).encode(list(texts.values()))
    with open(out / "preferences.jsonl", "w", encoding="utf-8") as f:
        for u, text in texts.items():
            f.write(json.dumps({"user_id": u, "text": text}) + "\n")
    np.save(out / "preference_vectors.npy", vectors.astype(np.float32))
    (out / "llm.json").write_text(
        json.dumps(
            {
                "base_model": base_model,
                "adapters": {"preference": None, "rerank": None},
                "prompt": {"max_history": 20},
                "rerank_k": 20,
                "preference_generation": {"max_tokens": 96, "temperature": 0.0, "repetition_penalty": 1.1},
            }
        )
    )
    (out / "metrics.json").write_text(json.dumps({"rows": []}))
    write_manifest(out, version="bench-tiny-1", dataset="synthetic", config={"seed": seed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run directory to create (must not exist)")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="llm.json base_model")
    args = parser.parse_args()
    print(build(args.out, args.users, args.items, args.model))


if __name__ == "__main__":
    main()
