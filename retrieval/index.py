"""FAISS inner-product index over item vectors, with exclusion of already-seen items.

Reference: FAISS (Johnson, Douze & Jegou, *Billion-scale similarity search with GPUs*, 2017;
wiki "Guidelines to choose an index"). Small catalogs use exact search (``IndexFlatIP``); above a
threshold (default 100k items) an HNSW graph (``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``), whose
recall against exact search is checked with :meth:`ItemIndex.recall_vs_exact`.

Row ``i`` of the item matrix is item index ``i`` (as in :class:`retrieval.catalog.Catalog`); row 0 is
padding and is never stored, so it is never returned. The FAISS index holds rows ``1..N`` and FAISS id
``j`` is item ``j + 1``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["auto", "flat", "hnsw"]
KINDS: tuple[str, ...] = ("auto", "flat", "hnsw")


@dataclass
class IndexConfig:
    kind: IndexKind = "auto"  # auto = flat up to hnsw_threshold items, HNSW above
    hnsw_threshold: int = 100_000  # catalog size from which "auto" builds HNSW (SPEC section 4)
    hnsw_m: int = 32  # graph degree: higher = better recall, more memory
    ef_construction: int = 200  # build-time beam width
    ef_search: int = 128  # query-time beam width (raised to k when k is larger)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hnsw_threshold", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-d, got shape {arr.shape}")
    return arr


class ItemIndex:
    """Top-k items by inner product with a query vector, skipping padding and excluded items."""

    def __init__(self, item_vectors: np.ndarray, cfg: IndexConfig | None = None, *, kind: IndexKind | None = None):
        """Index rows 1..N of ``item_vectors`` (N+1, H); row 0 (padding) is left out.

        ``kind`` overrides ``cfg.kind`` ("flat", "hnsw" or "auto").
        """
        cfg = cfg or IndexConfig()
        if kind is not None:
            cfg = replace(cfg, kind=kind)
        vectors = _as_matrix(item_vectors, "item_vectors")
        if len(vectors) < 2:
            raise ValueError("item_vectors needs the padding row 0 and at least one item (N+1 >= 2 rows)")
        items = vectors[1:]  # (N, H)
        dim = items.shape[1]
        index: faiss.Index
        if cfg.kind == "hnsw" or (cfg.kind == "auto" and len(items) >= cfg.hnsw_threshold):
            hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = cfg.ef_construction
            hnsw.hnsw.efSearch = cfg.ef_search
            index = hnsw
        else:
            index = faiss.IndexFlatIP(dim)
        index.add(items)
        self.index: faiss.Index = index
        self._vectors: np.ndarray | None = items  # rows 1..N; reconstructed lazily after load

    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "flat"

    @property
    def num_items(self) -> int:
        """N, the number of real items (indices 1..N)."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def _raw_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search returning item indices (FAISS id + 1; 0 where FAISS found nothing)."""
        k = min(k, self.num_items)
        if isinstance(self.index, faiss.IndexHNSW):
            # HNSW returns fewer than k results when efSearch < k; widen per call, never mutate the index
            ef = max(self.index.hnsw.efSearch, k)
            params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]  # missing from stubs
            scores, ids = self.index.search(queries, k, params=params)  # (B, k), (B, k)
        else:
            scores, ids = self.index.search(queries, k)  # (B, k), (B, k)
        return scores, np.where(ids >= 0, ids + 1, 0).astype(np.int64)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for each query (B, H): ``(scores (B, k) float32, items (B, k) int64)``.

        ``exclude[b]`` holds item indices never to return for query ``b`` (e.g. already seen). The
        search over-fetches ``k + max_b len(exclude[b])`` (and more, for rows an approximate index left
        short) so that exactly k items come back whenever the catalog has that many left; a row with
        fewer is filled with item 0 and score ``-inf``. Padding (item 0) is never returned as an item.
        """
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} sets for {len(q)} queries")
        B = len(q)
        out_scores = np.full((B, k), -np.inf, dtype=np.float32)  # (B, k)
        out_items = np.zeros((B, k), dtype=np.int64)  # (B, k)
        banned = [np.fromiter(exclude[b], dtype=np.int64) if exclude else np.empty(0, np.int64) for b in range(B)]
        fetch = k + max((len(x) for x in banned), default=0)
        todo = np.arange(B)  # rows still short of k items
        while len(todo):
            scores, items = self._raw_search(q[todo], fetch)  # (b, f), (b, f)
            short = []
            for r, b in enumerate(todo):
                keep = (items[r] > 0) & ~np.isin(items[r], banned[b])
                got = int(min(keep.sum(), k))
                out_scores[b, :got] = scores[r, keep][:got]
                out_items[b, :got] = items[r, keep][:got]
                if got < k:
                    short.append(b)
            if fetch >= self.num_items:  # everything was fetched: rows still short have no more items
                break
            todo = np.asarray(short, dtype=np.int64)
            fetch *= 2  # approximate search can miss items: ask again for more
        return out_scores, out_items

    @property
    def vectors(self) -> np.ndarray:
        """The stored item vectors (N, H), rows for items 1..N."""
        if self._vectors is None:
            self._vectors = self.index.reconstruct_n(0, self.num_items)
        return self._vectors

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force numpy top-k (no exclusion): the reference for :meth:`recall_vs_exact`."""
        q = _as_matrix(queries, "queries")
        k = min(k, self.num_items)
        scores = q @ self.vectors.T  # (B, N)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k), unordered
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1) + 1

    def recall_vs_exact(self, queries: np.ndarray, k: int = 10) -> float:
        """Mean fraction of the exact top-k items that the index returns in its top-k."""
        _, exact = self.exact_search(queries, k)
        _, approx = self.search(queries, k)
        hits = [len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact, approx, strict=True)]
        return float(np.mean(hits) / exact.shape[1])

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no FAISS index at {path}: write one with ItemIndex.save")
        out = cls.__new__(cls)
        out.index = faiss.read_index(str(path))
        out._vectors = None
        return out
