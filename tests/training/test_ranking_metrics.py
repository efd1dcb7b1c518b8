"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from training import ranking_metrics as M


def test_ranks_exclude_seen_and_padding():
    # items 1..5; user 0's target is 3; item 5 is seen and scores highest, padding scores higher still
    scores = np.array([[9.0, 0.1, 0.5, 0.4, 0.2, 0.9]])
    ranks = M.ranks_of_targets(scores, np.array([3]), [[5]])
    assert ranks.tolist() == [1]  # only item 2 (0.5) beats the target (0.4)


def test_ties_are_pessimistic():
    scores = np.zeros((1, 6))
    assert M.ranks_of_targets(scores, np.array([2]), None).tolist() == [4]


def test_metric_values_by_hand():
    values = M.summarize(np.array([0, 3, 12, M.MISS]))
    assert values["Recall@5"] == pytest.approx(2 / 4)
    assert values["Recall@20"] == pytest.approx(3 / 4)
    assert values["NDCG@5"] == pytest.approx((1.0 + 1 / math.log2(5)) / 4)
    assert values["NDCG@20"] == pytest.approx((1.0 + 1 / math.log2(5) + 1 / math.log2(14)) / 4)
    assert values["MRR@10"] == pytest.approx((1.0 + 1 / 4) / 4)
    assert values["NDCG@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 4)


def test_ranks_in_lists_missing_target_scores_zero():
    ranks = M.ranks_in_lists([[4, 2, 7], [1, 3]], [7, 9])
    assert ranks[0] == 2 and ranks[1] == M.MISS
    assert M.summarize(ranks)["Recall@20"] == 0.5


def test_bootstrap_ci_contains_true_difference_and_excludes_zero_for_clear_gap():
    rng = np.random.default_rng(1)
    b = rng.random(400)
    a = b + 0.1 + rng.normal(0, 0.05, 400)
    out = M.bootstrap_diff(a, b, n_boot=500)
    assert out["ci_low"] < 0.1 < out["ci_high"]
    assert out["ci_low"] > 0
    same = M.bootstrap_diff(b, b, n_boot=200)
    assert same["diff"] == 0.0 and same["ci_low"] == 0.0 == same["ci_high"]


def test_bootstrap_rejects_unpaired():
    with pytest.raises(ValueError, match="equal-length"):
        M.bootstrap_diff(np.ones(3), np.ones(4))
