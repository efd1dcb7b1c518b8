"""Final order and relevance scores: LLM probabilities on top, rank-derived scores below, monotone."""

from __future__ import annotations

import numpy as np
import pytest

from llm.scoring import label_probabilities
from service.ranking import final_order


def test_without_llm_scores_the_incoming_order_is_kept():
    order, scores = final_order(4, None)
    assert order == [0, 1, 2, 3] and scores == [1.0, 0.75, 0.5, 0.25]


def test_reranked_head_then_squashed_tail():
    probabilities = np.array([0.1, 0.6, 0.3])
    order, scores = final_order(6, probabilities)
    assert order == [1, 2, 0, 3, 4, 5]
    assert scores[:3] == [0.6, 0.3, 0.1]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    assert max(scores[3:]) < 0.1 and min(scores) > 0


def test_ties_keep_the_incoming_order():
    order, _ = final_order(3, np.array([0.25, 0.5, 0.25]))
    assert order == [1, 0, 2]


def test_empty_and_too_many_probabilities():
    assert final_order(0, None) == ([], [])
    with pytest.raises(ValueError):
        final_order(1, np.array([0.5, 0.5]))


def test_label_probabilities_normalise_and_reject_empty_output():
    p = label_probabilities(np.log(np.array([0.2, 0.2, 0.4])))
    assert p.sum() == pytest.approx(1.0) and p[2] == pytest.approx(0.5)
    assert label_probabilities(np.array([0.0, -np.inf]))[1] == 0.0
    with pytest.raises(ValueError):
        label_probabilities(np.array([-np.inf, -np.inf]))


def test_without_llm_scores_the_retrievers_scores_are_the_relevance_scores():
    retriever = np.array([2.5, 1.0, -0.3])
    assert final_order(3, None, retriever) == ([0, 1, 2], [2.5, 1.0, -0.3])
    assert final_order(3, None, None)[1] == [1.0, 2 / 3, 1 / 3]  # no retriever view: rank-derived
