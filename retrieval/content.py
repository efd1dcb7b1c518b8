"""The content tower: an item's text -> the retriever's item-vector space, for items the retriever never saw.

An ID model has no vector for an item added after training. After ZESRec / UniSRec and "Let It Go? Not
Quite" (arXiv 2507.19473: a frozen content embedding plus a small trainable map), an item's text (title,
genres, year: what the catalog holds) goes through the frozen sentence encoder the run already ships
(all-MiniLM-L6-v2, 384-d) and a ridge-regularised linear map fit on the warm items, whose trained SASRec
vectors are the targets. The same map over a multi-hot of genres and release decade is the control a
text model must beat (``genre_decade_features``).

One code path at training and at serving: ``item_text`` is the text both encode, ``ContentTower.vectors``
maps features to item vectors, and the run stores the tower in ``content_tower.npz``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from retrieval.catalog import Catalog, Item

CONTENT_FILE = "content_tower.npz"
DEFAULT_ALPHAS = (0.1, 1.0, 10.0, 100.0)  # ridge strengths tried on held-out warm items


class Encoder(Protocol):
    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray: ...


def item_text(item: Item) -> str:
    """What the encoder reads of an item: its title, genres and year (the catalog's text fields)."""
    parts = [item.title]
    if item.genres:
        parts.append("Genres: " + ", ".join(item.genres))
    if item.year is not None:
        parts.append(f"Year: {item.year}")
    parts.extend(f"{k}: {v}" for k, v in sorted(item.extra.items()))
    return ". ".join(parts)


def genre_decade_features(items: Sequence[Item], genres: Sequence[str], decades: Sequence[int]) -> np.ndarray:
    """The control's features (n, G + D + 1): a multi-hot of the item's genres and a one-hot of its release
    decade (the last column: no known decade)."""
    g_col = {g: j for j, g in enumerate(genres)}
    d_col = {d: len(genres) + j for j, d in enumerate(decades)}
    none = len(genres) + len(decades)  # the column of an item without a known decade
    out = np.zeros((len(items), none + 1), np.float32)  # (n, G + D + 1)
    for r, item in enumerate(items):
        for g in item.genres:
            if g in g_col:
                out[r, g_col[g]] = 1.0
        out[r, none if item.year is None else d_col.get(item.year // 10 * 10, none)] = 1.0
    return out


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge with an unpenalised bias: W (F, H), b (H,) minimising |xW + b - y|^2 + alpha |W|^2."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean  # (n, F), (n, H)
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])  # (F, F)
    weight = np.linalg.solve(gram, xc.T @ yc)  # (F, H)
    return weight.astype(np.float32), (y_mean - x_mean @ weight).astype(np.float32)


def _fit_score(pred: np.ndarray, target: np.ndarray) -> float:
    """How well held-out vectors are predicted: R^2 over all coordinates (1 - SSE / SST). Not the cosine:
    inner-product retrieval reads the vectors' lengths too."""
    sse = float(((pred - target) ** 2).sum())
    sst = float(((target - target.mean(0)) ** 2).sum()) + 1e-12
    return 1.0 - sse / sst


@dataclass
class ContentTower:
    """``features (n, F) -> item vectors (n, H)``: a ridge map fit on the warm items' trained vectors."""

    weight: np.ndarray  # (F, H)
    bias: np.ndarray  # (H,)
    alpha: float  # the ridge strength chosen on held-out warm items
    features: str = "text"  # "text": the sentence encoder over item_text; "genre_decade": the control
    holdout_r2: float = float("nan")  # R^2 on the held-out warm items at ``alpha``

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        *,
        features: str = "text",
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        holdout: float = 0.1,
        seed: int = 0,
    ) -> ContentTower:
        """Fit on warm items' features ``x`` (n, F) and trained vectors ``y`` (n, H); the ridge strength is the one
        whose map best predicts a held-out share of them (R^2), refit on all."""
        if len(x) != len(y) or len(x) < 10:
            raise ValueError(f"need >= 10 warm items with features and vectors, got {len(x)} and {len(y)}")
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        order = np.random.default_rng(seed).permutation(len(x))
        n_out = max(1, int(len(x) * holdout))
        out, keep = order[:n_out], order[n_out:]
        scores = {}
        for alpha in alphas:
            w, b = _ridge(x[keep], y[keep], alpha)
            scores[alpha] = _fit_score(x[out] @ w + b, y[out])
        best = max(scores, key=lambda a: scores[a])
        weight, bias = _ridge(x, y, best)
        return cls(weight, bias, float(best), features, scores[best])

    def vectors(self, x: np.ndarray) -> np.ndarray:
        """Item vectors (n, H) for features (n, F)."""
        return (np.asarray(x, np.float32) @ self.weight + self.bias).astype(np.float32)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # an open file: np.savez would add ".npz" to a name without it
            np.savez(
                f,
                weight=self.weight,
                bias=self.bias,
                alpha=np.float64(self.alpha),
                features=np.array(self.features),
                holdout_r2=np.float64(self.holdout_r2),
            )

    @classmethod
    def load(cls, path: Path) -> ContentTower:
        with np.load(path) as z:
            return cls(
                z["weight"].astype(np.float32),
                z["bias"].astype(np.float32),
                float(z["alpha"]),
                str(z["features"]),
                float(z["holdout_r2"]),
            )


def text_vectors(tower: ContentTower, encoder: Encoder, items: Sequence[Item], progress: bool = False) -> np.ndarray:
    """The content tower's item vectors (n, H) for catalog items, from their text."""
    if tower.features != "text":
        raise ValueError(f"this tower maps {tower.features!r} features, not text")
    if not items:
        return np.zeros((0, tower.weight.shape[1]), np.float32)
    return tower.vectors(encoder.encode([item_text(i) for i in items], progress=progress))


def fit_text_tower(encoder: Encoder, catalog: Catalog, warm: Sequence[int], item_vectors: np.ndarray) -> ContentTower:
    """The text tower fit on the ``warm`` items (catalog indices the retriever trained on), their rows of
    ``item_vectors`` (N+1, H) the targets: training calls it, and ``dpo4rec items add`` on a run without one."""
    x = encoder.encode([item_text(catalog[i]) for i in warm])  # (n, D)
    return ContentTower.fit(x, np.asarray(item_vectors)[list(warm)])
