"""A deadline the LLM cannot meet: the retriever's (or the caller's) order, flagged ``llm_timeout``."""

from __future__ import annotations

import time

from tests.service.support import metric

CANDIDATES = ["150", "141", "132", "123", "114", "105"]


def test_retriever_order_when_the_llm_is_too_slow(client, app):
    before = metric(app, "dpo4rec_degraded_responses_total", reason="llm_timeout")
    body = client.post("/rerank", json={"user_id": "u10", "top_n": 6, "deadline_ms": 1}).json()
    assert "llm_timeout" in body["degraded"]
    assert [r["index"] for r in body["results"]] == list(range(6))
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 6
    assert metric(app, "dpo4rec_degraded_responses_total", reason="llm_timeout") == before + 1
    # same user, enough time: the LLM re-ranks the same retrieved list
    relaxed = client.post("/rerank", json={"user_id": "u10", "top_n": 6}).json()
    assert relaxed["degraded"] == []
    assert all(r["index"] < 8 for r in relaxed["results"])  # the re-ranked head (rerank_k=8) comes first
    retrieved = [r["item_id"] for r in body["results"]]
    assert all(retrieved[r["index"]] == r["item_id"] for r in relaxed["results"] if r["index"] < 6)


def test_given_order_when_the_llm_is_too_slow(client):
    body = client.post("/rerank", json={"user_id": "u11", "candidates": CANDIDATES, "deadline_ms": 1}).json()
    assert "llm_timeout" in body["degraded"]
    assert [r["item_id"] for r in body["results"]] == CANDIDATES
    assert [r["index"] for r in body["results"]] == list(range(len(CANDIDATES)))


def test_timed_out_llm_work_is_aborted(client, app):
    client.post("/rerank", json={"user_id": "u12", "candidates": CANDIDATES, "deadline_ms": 1})
    deadline = time.monotonic() + 10
    while metric(app, "dpo4rec_engine_unfinished_requests") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(app, "dpo4rec_engine_unfinished_requests") == 0
    assert metric(app, "dpo4rec_llm_requests_in_flight", job="rerank") == 0
