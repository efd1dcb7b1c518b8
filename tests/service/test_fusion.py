"""The run's scoring in the service: the fused score (retriever + w x de-biased LLM), and w = 0 answering
without an engine call (said in /readyz)."""

from __future__ import annotations

import dataclasses

import numpy as np

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
