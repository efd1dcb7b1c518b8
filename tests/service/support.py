"""Helpers of the service tests: the tiny run directory builder, settings, and loop/metric helpers."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.testclient import TestClient

from retrieval.catalog import Catalog, Item
from retrieval.content import CONTENT_FILE, fit_text_tower
from retrieval.encoder import EncoderConfig, TextEncoder
from retrieval.index import ItemIndex
from retrieval.sasrec import SASRec, SASRecConfig
from rundir.manifest import write_manifest

T = TypeVar("T")
VERSION = "tiny-test-1"
N_ITEMS = 60
N_USERS = 30
USERS_WITH_PREFERENCES = 25  # users 25..29 are known but have no precomputed preference
API_KEY = "test-key-0123456789"
GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation")
WORDS = ("Night", "River", "Star", "Ghost", "Summer", "Iron", "Silent", "Golden", "Last", "Wild", "Dark", "Lost")


def _catalog(rng: random.Random) -> Catalog:
    items = []
    for i in range(1, N_ITEMS + 1):
        year = rng.randint(1950, 2020)
        title = f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i} ({year})"
        genres = tuple(sorted(rng.sample(GENRES, rng.randint(1, 3))))
        items.append(Item(item_id=str(100 + i), title=title, genres=genres, year=year))
    return Catalog(items)


def build_run_dir(root: Path, llm_dir: Path, seed: int = 0) -> Path:
    """Write a complete tiny run directory into ``root`` (which must not exist)."""
    import torch

    rng = random.Random(seed)
    root.mkdir(parents=True)
    catalog = _catalog(rng)
    catalog.save(root / "catalog.jsonl")
    users = {f"u{u}": rng.sample(range(1, N_ITEMS + 1), rng.randint(6, 14)) for u in range(N_USERS)}
    (root / "users.json").write_text(json.dumps(users))
    torch.manual_seed(seed)
    model = SASRec(
        SASRecConfig(num_items=N_ITEMS, max_len=20, hidden=32, layers=1, heads=1, dropout=0.0, pref_dim=384)
    ).eval()
    model.save(root / "retriever")
    ItemIndex(model.item_vectors()).save(root / "index.faiss")
    encoder_cfg = EncoderConfig()
    (root / "encoder.json").write_text(json.dumps(asdict(encoder_cfg)))
    known = list(users)[:USERS_WITH_PREFERENCES]
    texts = {
        u: f"Likes {' and '.join(catalog[i].genres[0] for i in users[u][-2:])} films, mostly recent ones."
        for u in known
    }
    encoder = TextEncoder(encoder_cfg)
    vectors = encoder.encode([texts[u] for u in known])
    warm = sorted({i for history in users.values() for i in history})  # the content tower's fit
    fit_text_tower(encoder, catalog, warm, model.item_vectors()).save(root / CONTENT_FILE)
    with open(root / "preferences.jsonl", "w", encoding="utf-8") as f:
        for u in known:
            f.write(json.dumps({"user_id": u, "text": texts[u]}) + "\n")
    import numpy as np

    np.save(root / "preference_vectors.npy", vectors.astype(np.float32))
    (root / "llm.json").write_text(
        json.dumps(
            {
                "base_model": str(llm_dir),
                "adapters": {"preference": None, "rerank": None},
                "prompt": {"max_history": 20, "max_recent": 5, "preference_words": 20},
                "rerank_k": 8,
                "preference_generation": {"max_tokens": 12, "temperature": 0.0},
            }
        )
    )
    (root / "metrics.json").write_text(json.dumps({"rows": []}))
    write_manifest(root, version=VERSION, dataset="synthetic-tiny", config={"seed": seed})
    return root


def base_settings(run_dir: Path, **overrides: Any) -> Any:
    from service.settings import Settings

    values: dict[str, Any] = {
        "run_dir": run_dir,
        "deadline_ms": 60_000,  # generous: the CPU is shared; tests pass small deadlines explicitly
        "max_model_len": 1024,
        "max_num_seqs": 16,
        "max_in_flight": 32,
        "redis_retry_after_s": 0.2,
        "preference_timeout_s": 60.0,
        "json_logs": False,
        **overrides,
    }
    return Settings.model_validate(values)


def run_async(client: TestClient, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` on the app's event loop (where the engine and Redis clients live)."""
    assert client.portal is not None, "use the client inside its context manager"
    return client.portal.call(fn)


def metric(app: FastAPI, name: str, **labels: str) -> float:
    return float(app.state.metrics.value(name, labels))
