"""What the training stages share: the stage timer, the state a stage starts from, SASRec training and
test ranks, the prompt settings, row and comparison records.

The pipeline (``training.pipeline``) calls the stages in order; the stages (``training.base_preferences``,
``training.preference_dpo``, ``training.rerank_training``) import this module and ``training.engines``,
never the pipeline or each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.prompts import PromptConfig
from retrieval.catalog import Catalog
from retrieval.encoder import TextEncoder
from retrieval.sasrec import SASRec, SASRecConfig
from rundir.manifest import atomic_write_text
from training import ranking_metrics as M
from training.config import PipelineConfig
from training.dpo import TrainResult
from training.retriever import RetrieverTrainConfig, train_retriever
from training.split import Split

log = logging.getLogger(__name__)

BASE_ROW = "SASRec + base-LLM preferences"


class StageTimer:
    """Times the stages; with ``status``, keeps a JSON file saying which stage runs and which are done (a
    service training its next version in the background shows it on /readyz: ``service.background``)."""

    def __init__(self, status: Path | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.status = status
        self.began = time.time()

    def _write(self, stage: str | None) -> None:
        if self.status is not None:
            doc = {"pid": os.getpid(), "started": self.began, "stage": stage, "stage_started": time.time()}
            atomic_write_text(self.status, json.dumps({**doc, "done": self.seconds}))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        self._write(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self._write(None)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


@dataclass
class StageInputs:
    """The pipeline's state after the base-preference row: what the DPO loop and the re-rank stage start from."""

    cfg: PipelineConfig
    catalog: Catalog
    split: Split
    users: list[str]
    model_dir: Path  # the base LLM folder (llm.models.resolve_model)
    encoder: TextEncoder
    texts: dict[str, str]  # base-LLM preference per user
    vectors: np.ndarray  # (U, D) their encoder vectors, rows in ``users`` order
    retriever: SASRec  # the augmented SASRec trained on ``vectors``
    ranks: np.ndarray  # (U,) its test ranks: the base-preference row
    samples: dict[str, list[str]] | None = None  # round-1 samples per DPO user (training.base_preferences)


@dataclass
class Served:
    """What the run serves so far: preference texts and vectors, the retriever on them, its row and test ranks."""

    row: str
    texts: dict[str, str]
    vectors: np.ndarray  # (U, D), rows in the pipeline's user order
    retriever: SASRec
    ranks: np.ndarray  # (U,) test ranks of ``retriever``


def popularity_scores(catalog: Catalog, sequences: dict[str, list[int]]) -> np.ndarray:
    """(N+1,) interaction counts over the given sequences; the most-popular baseline's scores."""
    counts = np.zeros(catalog.num_embeddings, dtype=np.float64)
    for items in sequences.values():
        np.add.at(counts, np.asarray(items, dtype=np.int64), 1.0)
    return counts


def ranks_on_test(scores: np.ndarray, split: Split, users: list[str]) -> np.ndarray:
    """Test-item ranks; the user has already seen training and validation items."""
    targets = np.array([split.users[u].test for u in users])
    exclude = [[*split.users[u].train, split.users[u].valid] for u in users]
    return M.ranks_of_targets(scores, targets, exclude)


def is_selection_user(user: str, share: float) -> bool:
    """Whether ``user``'s validation item is kept for choosing the served model (never for early stopping):
    a stable hash of the id (crc32, not ``hash()``: the same users in every process and run)."""
    return share > 0 and zlib.crc32(user.encode("utf-8")) % 10_000 < share * 10_000


def train_sasrec(
    cfg: PipelineConfig,
    catalog: Catalog,
    split: Split,
    users: list[str],
    prefs: dict[str, np.ndarray] | None,
    pref_dim: int,
) -> tuple[SASRec, list[dict[str, Any]]]:
    r = cfg.retriever
    model_cfg = SASRecConfig(
        num_items=len(catalog),
        max_len=r.max_len,
        hidden=r.hidden,
        layers=r.layers,
        heads=r.heads,
        dropout=r.dropout,
        pref_dim=pref_dim,
        fusion=r.fusion,
        adaptor_hidden=r.adaptor_hidden,
    )
    train_cfg = RetrieverTrainConfig(
        epochs=r.epochs,
        batch_size=r.batch_size,
        lr=r.lr,
        weight_decay=r.weight_decay,
        patience=r.patience,
        seed=r.seed,
        max_len=r.max_len,
        windows=r.windows,
        num_threads=r.num_threads,
    )
    train_seqs = {u: split.users[u].train for u in users}
    stop = [u for u in users if not is_selection_user(u, cfg.eval.select_share)] or list(users)
    valid = {u: split.users[u].valid for u in stop}  # early stopping; the selection users choose the served model
    described = None  # the items each preference text was written from (the prompt's newest items)
    if prefs is not None and r.mask_described:
        described = {u: train_seqs[u][-cfg.llm.history_items :] for u in users}
    return train_retriever(train_cfg, model_cfg, train_seqs, valid, prefs, progress=True, described=described)


def served_histories(split: Split, users: list[str]) -> dict[str, list[int]]:
    return {u: [*split.users[u].train, split.users[u].valid, split.users[u].test] for u in users}


def prompt_histories(split: Split, users: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """What a preference prompt may see: the training part of each history, never valid or test."""
    return {u: (split.users[u].train, split.users[u].train_ratings) for u in users}


def system_row(name: str, ranks: np.ndarray) -> dict[str, Any]:
    return {"system": name, **M.summarize(ranks), "users": int(len(ranks))}


def prompt_config(cfg: PipelineConfig) -> PromptConfig:
    """Both jobs' prompt settings, saved in llm.json so the service builds the prompts training saw."""
    return PromptConfig(
        max_history=cfg.llm.history_items,
        max_recent=cfg.rerank.recent_items,
        max_preference_chars=cfg.rerank.preference_chars,
    )


def sample_users(users: Sequence[str], n: int | None, seed: int) -> list[str]:
    """``n`` users drawn without replacement (seeded), kept in ``users`` order; all when n is None."""
    if n is None or n >= len(users):
        return list(users)
    picked = set(np.random.default_rng(seed).choice(len(users), size=n, replace=False).tolist())
    return [u for i, u in enumerate(users) if i in picked]


def compare(
    per_user: dict[str, dict[str, np.ndarray]], a: str, b: str, metrics: Sequence[str], n_boot: int
) -> list[dict[str, Any]]:
    return [
        {"a": a, "b": b, "metric": m, **M.bootstrap_diff(per_user[a][m], per_user[b][m], n_boot=n_boot)}
        for m in metrics
    ]


def _finite(values: Sequence[float]) -> list[float | None]:
    """JSON-safe curve values: NaN (a key a logging step lacked) becomes null."""
    return [None if (v is None or math.isnan(v)) else round(float(v), 6) for v in values]


def train_summary(result: TrainResult) -> dict[str, Any]:
    return {
        "examples": result.examples,
        "dropped_long": result.dropped_long,
        "setup_seconds": result.setup_seconds,
        "train_seconds": result.train_seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
    }


def curve_json(result: TrainResult) -> dict[str, list[float | None]]:
    return {key: _finite(values) for key, values in result.curves.items()}
