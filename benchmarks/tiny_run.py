"""A small synthetic run directory for developing ``service_bench.py`` without a full training run.

Same approach as ``tests/service/support.py``: a synthetic catalog, users with random histories, an
untrained preference-fused SASRec and its FAISS index, preference texts encoded by the real text
encoder; but the LLM is the real SmolLM2-135M-Instruct (``llm.json`` base_model, converted once into
the model cache) with the default re-rank K of 20, so the prompts have realistic lengths.

    python benchmarks/tiny_run.py --out /tmp/bench-dev/tiny [--users 200] [--items 300]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation", "Crime", "War")
WORDS = ("Night", "River", "Star", "Ghost", "Summer", "Iron", "Silent", "Golden", "Last", "Wild", "Dark", "Lost")


def build(out: Path, n_users: int, n_items: int, base_model: str, seed: int = 0) -> Path:
    import numpy as np
    import torch

    from llm.engine import GenerationConfig
    from llm.prompts import PromptConfig
    from retrieval.catalog import Catalog, Item
    from retrieval.encoder import EncoderConfig, TextEncoder
    from retrieval.index import ItemIndex
    from retrieval.sasrec import SASRec, SASRecConfig
    from rundir.spec import LLMSpec
    from rundir.writer import RunContents, write_run

    rng = random.Random(seed)
    items = []
    for i in range(1, n_items + 1):
        year = rng.randint(1950, 1998)
        title = f"The {rng.choice(WORDS)} {rng.choice(WORDS)} of {rng.choice(WORDS)} {i} ({year})"
        items.append(
            Item(item_id=str(i), title=title, genres=tuple(sorted(rng.sample(GENRES, rng.randint(1, 3)))), year=year)
        )
    catalog = Catalog(items)
    users = {str(u): rng.sample(range(1, n_items + 1), rng.randint(20, 60)) for u in range(1, n_users + 1)}
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(num_items=n_items, max_len=50, hidden=64, layers=2, heads=1, dropout=0.0, pref_dim=384))
    model = model.eval()
    encoder_cfg = EncoderConfig()
    texts = {}
    for u, hist in users.items():
        genres = sorted({g for i in hist[-10:] for g in catalog[i].genres})
        decade = rng.choice(["50s", "60s", "70s", "80s", "90s"])
        texts[u] = (
            f"This user enjoys {', '.join(genres[:3])} films from the {decade}, "
            "with a taste for character-driven stories, tense atmosphere and memorable endings; light on romance, "
            "open to older classics and to ambitious genre films for adult audiences."
        )
    vectors = TextEncoder(encoder_cfg).encode(list(texts.values())).astype(np.float32)
    llm = LLMSpec(
        base_model=base_model,
        adapters={"preference": None, "rerank": None},
        prompt=PromptConfig(max_history=20),
        rerank_k=20,
        preference_generation=GenerationConfig(max_tokens=96, temperature=0.0, repetition_penalty=1.1),
    )
    contents = RunContents(
        catalog=catalog,
        retriever=model,
        encoder=encoder_cfg,
        index=ItemIndex(model.item_vectors()),
        texts=texts,
        vectors=vectors,
        users=users,
        llm=llm,
        metrics={"rows": []},
    )
    return write_run(out, contents, version="bench-tiny-1", dataset="synthetic", config={"seed": seed}, headline={})


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
