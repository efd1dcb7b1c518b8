"""ItemIndex: exact search equals numpy, HNSW recall, exclusion, padding, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.index import IndexConfig, ItemIndex
from retrieval.sasrec import SASRec, SASRecConfig

H = 32


def item_matrix(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n + 1, H)).astype(np.float32)  # (N+1, H)
    vectors[0] = 0.0  # padding row
    return vectors


def queries(b: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, H)).astype(np.float32)


def brute_force(vectors: np.ndarray, q: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    scores = (q @ vectors.T).astype(np.float64)  # (B, N+1)
    scores[:, 0] = -np.inf
    for b, seen in enumerate(exclude or []):
        scores[b, [i for i in seen if i < len(vectors)]] = -np.inf
    items = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, items, axis=1), items


def test_flat_search_equals_numpy_top_k():
    vectors, q = item_matrix(500), queries(20)
    index = ItemIndex(vectors)
    assert index.kind == "flat" and index.num_items == 500 and index.dim == H
    scores, items = index.search(q, 10)
    ref_scores, ref_items = brute_force(vectors, q, 10)
    assert scores.shape == items.shape == (20, 10) and items.dtype == np.int64
    np.testing.assert_array_equal(items, ref_items)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    assert index.recall_vs_exact(q, 10) == 1.0


def test_hnsw_recall_against_exact_search():
    vectors, q = item_matrix(3000), queries(100)
    index = ItemIndex(vectors, kind="hnsw")
    assert index.kind == "hnsw"
    assert index.recall_vs_exact(q, 10) >= 0.95
    assert (index.search(q, 10)[1] > 0).all()


def test_auto_switches_to_hnsw_above_the_threshold():
    vectors = item_matrix(300)
    assert ItemIndex(vectors).kind == "flat"
    assert ItemIndex(vectors, IndexConfig(hnsw_threshold=300)).kind == "hnsw"
    assert ItemIndex(vectors, IndexConfig(hnsw_threshold=10), kind="flat").kind == "flat"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_exclusion_returns_exactly_k_unseen_items(kind):
    vectors, q = item_matrix(400), queries(8)
    index = ItemIndex(vectors, kind=kind)
    _, top = brute_force(vectors, q, 60)
    exclude = [set(top[b, : 10 * b].tolist()) | {0, 10_000} for b in range(8)]  # up to the best 70 seen
    scores, items = index.search(q, 10, exclude)
    assert items.shape == (8, 10) and np.isfinite(scores).all()
    for b in range(8):
        assert not set(items[b].tolist()) & exclude[b] and 0 not in items[b]
    if kind == "flat":
        np.testing.assert_array_equal(items, brute_force(vectors, q, 10, exclude)[1])


def test_padding_fills_rows_when_too_few_items_are_left():
    vectors, q = item_matrix(5), queries(2)
    scores, items = ItemIndex(vectors).search(q, 8, [{1, 2}, set()])
    assert sorted(items[0, :3].tolist()) == [3, 4, 5] and (items[0, 3:] == 0).all()
    assert sorted(items[1, :5].tolist()) == [1, 2, 3, 4, 5] and (items[1, 5:] == 0).all()
    assert np.isneginf(scores[0, 3:]).all() and np.isfinite(scores[0, :3]).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    vectors, q = item_matrix(300), queries(5)
    index = ItemIndex(vectors, kind=kind)
    index.save(tmp_path / "index.faiss")
    loaded = ItemIndex.load(tmp_path / "index.faiss")
    assert loaded.kind == kind and loaded.num_items == 300
    for a, b in zip(index.search(q, 7, [{1}] * 5), loaded.search(q, 7, [{1}] * 5), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.vectors, vectors[1:])


def test_bad_arguments_are_explained(tmp_path):
    index = ItemIndex(item_matrix(10))
    with pytest.raises(ValueError, match="dim"):
        index.search(np.zeros((1, H + 1), np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries(1), 0)
    with pytest.raises(ValueError, match="exclude has 2 sets"):
        index.search(queries(1), 3, [set(), set()])
    with pytest.raises(ValueError, match="padding row"):
        ItemIndex(np.zeros((1, H), np.float32))
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="ivf")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="ItemIndex.save"):
        ItemIndex.load(tmp_path / "missing.faiss")


def test_index_over_sasrec_matches_full_sort_predict():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=50, max_len=8, hidden=16))
    histories = [[1, 2, 3], [10, 20], [49, 50, 1, 7]]
    index = ItemIndex(model.item_vectors())
    _, items = index.search(model.user_vectors(histories), 5, [set(h) for h in histories])
    scores = model.full_sort_predict(histories).numpy().astype(np.float64)  # (3, N+1)
    scores[:, 0] = -np.inf
    for b, h in enumerate(histories):
        scores[b, h] = -np.inf
    np.testing.assert_array_equal(items, np.argsort(-scores, axis=1, kind="stable")[:, :5])
