"""Ranking metrics for leave-one-out evaluation: NDCG@k, Recall@k, MRR@k, and bootstrap CIs.

With one held-out item per user, Recall@k is a hit (rank < k), NDCG@k is ``1 / log2(rank + 2)`` for a
hit and 0 otherwise, and MRR@k is ``1 / (rank + 1)`` for a hit (rank 0-based). Ranking is over all
items minus those the user has already seen (full ranking, as in RecBole's ``full_sort_predict``);
a user whose target falls outside a candidate set scores 0 (its rank is set to ``MISS``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (5, 10, 20)
MISS = np.iinfo(np.int64).max // 2  # rank of a target that was never ranked


def ranks_of_targets(
    scores: np.ndarray, targets: np.ndarray, exclude: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """0-based rank of each user's target among all items.

    scores: (U, N+1) with column 0 the padding item, never ranked; targets: (U,) item indices;
    exclude[u]: items already seen by user u, removed from the ranking (the target never is).
    Ties are broken pessimistically (an item scoring equal to the target ranks above it), so a
    constant scorer cannot look good.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)  # (U, N+1)
    scores[:, 0] = -np.inf
    rows = np.arange(len(targets))
    if exclude is not None:
        for u, seen in enumerate(exclude):
            if len(seen):
                scores[u, np.asarray(seen, dtype=np.int64)] = -np.inf
    target_scores = scores[rows, targets].copy()  # (U,)
    scores[rows, targets] = -np.inf
    return (scores >= target_scores[:, None]).sum(axis=1).astype(np.int64)


def ranks_in_lists(ranked: Sequence[Sequence[int]], targets: Sequence[int]) -> np.ndarray:
    """0-based rank of each target in an explicit ranked list; ``MISS`` when absent."""
    out = np.full(len(targets), MISS, dtype=np.int64)
    for u, (items, target) in enumerate(zip(ranked, targets, strict=True)):
        for r, item in enumerate(items):
            if item == target:
                out[u] = r
                break
    return out


def per_user(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-user metric values (U,) for every metric name, e.g. ``NDCG@10``."""
    ranks = np.asarray(ranks, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[f"NDCG@{k}"] = np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
        out[f"Recall@{k}"] = hit.astype(np.float64)
    hit10 = ranks < 10
    out["MRR@10"] = np.where(hit10, 1.0 / (np.minimum(ranks, 10) + 1.0), 0.0)
    return out


def summarize(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean of every metric over users."""
    return {name: float(values.mean()) for name, values in per_user(ranks, ks).items()}


def bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap of mean(a - b) over users: the difference and its (1 - alpha) CI."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples must be equal-length 1-d arrays, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(len(diff))}
