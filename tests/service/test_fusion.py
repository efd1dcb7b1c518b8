"""The run's scoring in the service: the fused score (retriever + w x de-biased LLM), and w = 0 answering
without an engine call (said in /readyz)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llm.scoring import ScoringSpec
from service.protocol import RerankRequest
from service.rerank_pipeline import RerankPipeline
from tests.service.support import metric, run_async


def pipeline_with(app, scoring: ScoringSpec) -> RerankPipeline:
    """The app's own pipeline parts (engine, Redis, preferences), the run's llm.json scoring replaced."""
    state = app.state.service
    artifacts = dataclasses.replace(state.artifacts, llm=dataclasses.replace(state.artifacts.llm, scoring=scoring))
    return RerankPipeline(artifacts, app.state.settings, state.preferences, state.llm, app.state.metrics)


def test_weight_zero_answers_in_retriever_order_without_an_engine_call(client, app):
    pipeline = pipeline_with(app, ScoringSpec(weight=0.0))
    request = RerankRequest(user_id="u3", top_n=8)
    before = metric(app, "dpo4rec_llm_calls_total", job="rerank")
    answer = run_async(client, lambda: pipeline.rerank(request, "w0"))
    assert metric(app, "dpo4rec_llm_calls_total", job="rerank") == before  # the engine was never asked
    assert [r.index for r in answer.results] == list(range(8)) and answer.degraded == []
    # the same request with the LLM on calls the engine once per candidate order
    on = pipeline_with(app, ScoringSpec(weight=1.0, permutations=2))
    answer = run_async(client, lambda: on.rerank(request, "w1"))
    assert metric(app, "dpo4rec_llm_calls_total", job="rerank") == before + 2 and answer.degraded == []


def test_fused_order_moves_from_the_retrievers_to_the_llms_as_the_weight_grows(client, app):
    request = RerankRequest(user_id="u4", top_n=8)
    orders = {}
    for w in (0.001, 1000.0, None):  # almost the retriever; almost the LLM; the LLM alone
        answer = run_async(client, lambda w=w: pipeline_with(app, ScoringSpec(weight=w)).rerank(request, f"w{w}"))
        orders[w] = [r.index for r in answer.results]
        scores = [r.relevance_score for r in answer.results]
        assert scores == sorted(scores, reverse=True) and np.isclose(sum(scores), 1.0)  # a distribution over K
    assert orders[0.001] == list(range(8)) != orders[None]  # the LLM alone moves something
    assert orders[1000.0][0] == orders[None][0]  # the LLM's favourite wins once its weight dominates


def test_readyz_says_how_candidates_are_scored(client):
    rerank = client.get("/readyz").json()["checks"]["rerank"]
    assert rerank["ok"] and rerank["detail"].startswith("LLM order")  # the tiny run's llm.json has no scoring


def test_given_candidates_are_ranked_by_the_retriever_and_new_items_by_their_content_vector(client, app):
    """At weight 0 the answer is the retriever's order and score (not a rank) of the given candidates; a new item
    is scored through the run's content tower, as ``dpo4rec items add`` would store it, not by a prior."""
    from retrieval.catalog import Item
    from retrieval.content import text_vectors

    pipeline = pipeline_with(app, ScoringSpec(weight=0.0))
    new = {"id": "new-1", "title": "Golden River 7 (2031)", "categories": ["Drama", "Romance"], "year": 2031}
    request = RerankRequest(user_id="u6", candidates=["150", new, "141", "120", "101"], top_n=5)
    answer = run_async(client, lambda: pipeline.rerank(request, "content"))
    art = app.state.service.artifacts
    _, pref = art.preference_of("u6")
    query = art.retriever.user_vectors([art.users["u6"][-art.retriever.cfg.max_len :]], pref[None])[0]  # (H,)
    vectors = art.retriever.item_vectors()
    new_vector = text_vectors(
        art.content, app.state.service.preferences.encoder, [Item("", new["title"], ("Drama", "Romance"), 2031)]
    )[0]
    expected = {i: float(vectors[art.catalog.index_of(i)] @ query) for i in ("150", "141", "120", "101")}
    expected["new-1"] = float(new_vector @ query)
    got = {r.item_id: r.relevance_score for r in answer.results}
    assert got == pytest.approx(expected, abs=1e-4)
    assert [r.item_id for r in answer.results] == sorted(expected, key=lambda i: -expected[i])
    assert {r.item_id: r.index for r in answer.results}["new-1"] == 1  # index: the position in the request
    prior = float(np.mean([expected[i] for i in ("150", "141", "120", "101")]))
    assert abs(expected["new-1"] - prior) > 1e-6  # the content score is not the old constant prior


def test_routing_calls_the_engine_only_on_slices_whose_weight_is_above_zero(client, app):
    spec = ScoringSpec(weight=0.0, slice_weights={"warm": 0.0, "new_items": 1.0, "new_users_3": 0.0})
    pipeline = pipeline_with(app, spec)
    new = {"id": "new-9", "title": "Silent Star 9 (2031)", "categories": ["Sci-Fi"], "year": 2031}
    calls = lambda: metric(app, "dpo4rec_llm_calls_total", job="rerank")  # noqa: E731
    answers = lambda s, by: metric(app, "dpo4rec_answers_total", slice=s, scorer=by)  # noqa: E731
    before, warm_before = calls(), answers("warm", "retriever")
    warm = run_async(client, lambda: pipeline.rerank(RerankRequest(user_id="u3", top_n=5), "warm"))
    assert calls() == before and (warm.slice, warm.scored_by) == ("warm", "retriever")  # no engine call
    assert answers("warm", "retriever") == warm_before + 1
    short = RerankRequest(user_id="x", history=["101", "102"], candidates=["103", "104", "105"])
    answer = run_async(client, lambda: pipeline.rerank(short, "short"))
    assert calls() == before and (answer.slice, answer.scored_by) == ("new_users_3", "retriever")
    mixed = RerankRequest(user_id="u3", candidates=["150", new, "141", "120"], top_n=4)
    answer = run_async(client, lambda: pipeline.rerank(mixed, "new-items"))
    assert calls() == before + 1 and (answer.slice, answer.scored_by) == ("new_items", "llm")
    assert answer.prompt_tokens and answers("new_items", "llm") >= 1
