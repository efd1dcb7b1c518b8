"""The content tower: a ridge map from item features to the retriever's item vectors, chosen on held-out items."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.catalog import Item
from retrieval.content import ContentTower, genre_decade_features, item_text


def test_ridge_recovers_a_linear_map_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    w = rng.normal(size=(16, 8))
    y = x @ w + 0.5 + 0.01 * rng.normal(size=(400, 8))
    tower = ContentTower.fit(x, y, alphas=(0.01, 1000.0))
    assert tower.alpha == 0.01 and tower.holdout_r2 > 0.99  # the weak penalty wins on clean data
    np.testing.assert_allclose(tower.vectors(x[:5]), y[:5], atol=0.1)
    tower.save(tmp_path / "tower.npz")
    back = ContentTower.load(tmp_path / "tower.npz")
    np.testing.assert_array_equal(back.weight, tower.weight) and back.alpha == tower.alpha
    noisy = ContentTower.fit(x[:40], rng.normal(size=(40, 8)), alphas=(0.01, 1e4), holdout=0.25)
    assert noisy.alpha == 1e4  # targets the features do not explain: shrink to the mean
    with pytest.raises(ValueError, match=">= 10 warm items"):
        ContentTower.fit(x[:5], y[:5])


def test_item_text_and_the_genre_decade_control():
    items = [Item("1", "Toy Story (1995)", ("Animation", "Comedy"), 1995), Item("2", "Untitled")]
    assert item_text(items[0]) == "Toy Story (1995). Genres: Animation, Comedy. Year: 1995"
    assert item_text(items[1]) == "Untitled"
    feats = genre_decade_features(items, ["Animation", "Comedy", "Drama"], [1990, 2000])
    assert feats.tolist() == [[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]  # genres, decades, no decade
