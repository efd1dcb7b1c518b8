"""llm.scoring: PriDe's label prior recovered on a hand-made case, de-biasing, candidate orders, fusion."""

from __future__ import annotations

import numpy as np
import pytest

from llm.scoring import (
    ScoringSpec,
    debias,
    estimate_prior,
    fused_scores,
    item_logprobs,
    log_softmax,
    order,
    rotate,
    shifts,
)


def observed(prior: np.ndarray, content: np.ndarray, shift: int) -> np.ndarray:
    """A model whose label log-probs are prior(position) x content(item shown there), renormalised."""
    shown = np.asarray(rotate(list(content), shift))
    return log_softmax(np.log(prior) + shown)


def test_prior_is_recovered_and_removed_on_a_hand_made_case() -> None:
    k = 5
    prior = np.array([0.5, 0.2, 0.15, 0.1, 0.05])  # a model that loves label A
    rng = np.random.default_rng(0)
    contents = [rng.normal(size=k) for _ in range(4)]
    blocks = [np.stack([observed(prior, c, s) for s in range(k)]) for c in contents]  # all K cyclic shifts
    np.testing.assert_allclose(np.exp(estimate_prior(blocks)), prior, atol=1e-9)
    # de-biased, the scores are the content's own distribution: the prior is gone
    for c in contents:
        np.testing.assert_allclose(debias(observed(prior, c, 0), np.log(prior)), log_softmax(c), atol=1e-9)
    # raw, a flat content still answers A; de-biased it has no favourite
    flat = observed(prior, np.zeros(k), 0)
    assert order(flat)[0] == 0
    np.testing.assert_allclose(np.exp(debias(flat, np.log(prior))), 1 / k, atol=1e-9)


def test_missing_labels_and_bad_blocks() -> None:
    x = debias(np.array([-0.1, -np.inf, -3.0]), None)
    assert np.isfinite(x).all() and np.exp(x).sum() == pytest.approx(1.0) and order(x).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="no finite"):
        debias(np.array([-np.inf, -np.inf]), None)
    with pytest.raises(ValueError, match="at least one"):
        estimate_prior([])
    with pytest.raises(ValueError, match="covers 2 positions"):
        debias(np.zeros(3), [0.0, 0.0])


def test_candidate_orders_map_back_to_the_items() -> None:
    assert shifts(10, 1) == [0] and shifts(10, 2) == [0, 5] and shifts(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        shifts(3, 4)
    content = np.array([3.0, 1.0, 2.0, 0.0])  # item 0 best, then 2, 1, 3
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    orders = [0, 2]
    per_order = [observed(prior, content, s) for s in orders]
    spec = ScoringSpec(log_prior=tuple(np.log(prior)))
    np.testing.assert_allclose(item_logprobs(per_order, orders, spec), log_softmax(content), atol=1e-9)
    # without the prior, two orders already cancel part of it: the items keep their content order here
    raw = item_logprobs(per_order, orders, ScoringSpec())
    assert order(raw).tolist() == [0, 2, 1, 3]


def test_fusion_is_scale_free_and_weight_zero_is_the_retriever() -> None:
    retriever = np.array([10.0, 9.0, 8.0, 7.0])
    llm = np.array([-3.0, -2.0, -1.0, -0.5])  # the LLM reverses the order
    assert order(fused_scores(retriever, llm, 0.0)).tolist() == [0, 1, 2, 3]
    assert order(fused_scores(retriever, llm, 10.0)).tolist() == [3, 2, 1, 0]
    np.testing.assert_allclose(fused_scores(retriever * 100, llm, 1.0), fused_scores(retriever, llm, 1.0))
    assert fused_scores(None, llm, None) is not None and order(fused_scores(None, llm, None))[0] == 3
    with pytest.raises(ValueError, match="needs the retriever"):
        fused_scores(None, llm, 0.5)


def test_spec_validation_and_llm_use() -> None:
    assert ScoringSpec().uses_llm and ScoringSpec(weight=0.5).uses_llm and not ScoringSpec(weight=0.0).uses_llm
    assert ScoringSpec(log_prior=[0.0, -1.0]).log_prior == (0.0, -1.0)  # lists from JSON
    with pytest.raises(ValueError, match="weight"):
        ScoringSpec(weight=-1.0)
    with pytest.raises(ValueError, match="permutations"):
        ScoringSpec(permutations=0)


def test_slice_weights_route_and_validate():
    from llm.scoring import ScoringSpec

    spec = ScoringSpec(weight=0.0, slice_weights={"new_items": 0.5})
    assert spec.uses_llm and spec.for_slice("new_items").weight == 0.5 and not spec.for_slice("warm").uses_llm
    assert spec.for_slice("new_items").slice_weights is None and hash(spec)  # frozen, still hashable
    assert not ScoringSpec(weight=0.0, slice_weights={"warm": 0.0}).uses_llm
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        ScoringSpec(weight=0.0, slice_weights={"new_items": -1.0})
