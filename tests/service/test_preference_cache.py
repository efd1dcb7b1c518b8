"""Preferences: a miss answered at once with the history stand-in while ONE background generation (however
many requests) fills the cache for the next request; the bounded queue; Redis outage and recovery."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.service.support import metric, run_async

HISTORY = ["101", "104", "109", "115", "122"]
GENERATIONS = "dpo4rec_preference_generations_total"
CACHE = "dpo4rec_preference_cache_lookups_total"


def test_cache_miss_then_hit_for_a_new_user(client, app):
    misses, generated = metric(app, CACHE, result="miss"), metric(app, GENERATIONS, outcome="ok")
    body = {"user_id": "new-cache-1", "history": HISTORY, "explain": True}
    first = client.post("/rerank", json=body).json()
    # answered without waiting: the history lines stand in, the LLM's text is on its way
    assert first["preference_source"] == "history" and first["degraded"] == ["preference_pending"]
    assert " | " in first["preference"]  # history lines ("Title (year) | genres; ..."), not an LLM text
    assert metric(app, CACHE, result="miss") == misses + 1
    second = _wait_for(lambda: _cached(client, body))
    assert second, "the background generation fills the cache"
    assert second["preference"] != first["preference"] and second["degraded"] == []
    assert metric(app, GENERATIONS, outcome="ok") == generated + 1


def test_a_miss_prompt_cuts_the_stand_in_the_retriever_reads_whole(client, app):
    state = app.state.service
    pipeline, llm = state.pipeline, state.llm
    k = pipeline.rerank_k
    body = {"user_id": "new-cut-1", "history": HISTORY, "explain": True, "top_n": k}
    cut = 40  # shorter than the stand-in of five history lines
    old, pipeline.settings.stand_in_prompt_chars = pipeline.settings.stand_in_prompt_chars, cut
    try:
        first = client.post("/rerank", json=body).json()
    finally:
        pipeline.settings.stand_in_prompt_chars = old
    assert first["preference_source"] == "history" and len(first["preference"]) > cut  # explain: the whole text
    # the prompt the engine scored, rebuilt: the stand-in cut to `cut` characters
    catalog = state.artifacts.catalog
    head = sorted((r for r in first["results"] if r["index"] < k), key=lambda r: r["index"])
    items = pipeline._items([catalog.index_of(r["item_id"]) for r in head])
    recent = pipeline._items(catalog.indices_of(HISTORY[-llm.cfg.prompt.max_recent :]))
    whole = llm.rerank_prompts(first["preference"], recent, items, pipeline.scoring)
    shown = llm.rerank_prompts(first["preference"], recent, items, pipeline.scoring, cut)
    assert first["prompt_tokens"] == shown.total_tokens < whole.total_tokens
    assert _wait_for(lambda: _cached(client, body)), "its background generation done before the next test counts"


def _cached(client, body):
    answer = client.post("/rerank", json=body).json()
    return answer if answer["preference_source"] == "cache" else None


def test_known_user_without_cache_entry_uses_the_run(client, app):
    state = app.state.service
    run_async(client, lambda: state.cache.client.delete(state.cache.key("u7")))
    body = client.post("/rerank", json={"user_id": "u7", "top_n": 3}).json()
    assert body["preference_source"] == "run"
    # and it was written back: the next request hits the cache
    assert client.post("/rerank", json={"user_id": "u7", "top_n": 3}).json()["preference_source"] == "cache"


def test_concurrent_requests_for_one_new_user_cause_one_generation(client, app):
    before = metric(app, GENERATIONS, outcome="ok")
    body = {"user_id": "new-burst-1", "history": HISTORY, "top_n": 3}

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            return list(await asyncio.gather(*(http.post("/rerank", json=body) for _ in range(8))))

    responses = run_async(client, burst)
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.json()["preference_source"] for r in responses} == {"history"}
    assert _wait_for(lambda: _cached(client, body))
    assert metric(app, GENERATIONS, outcome="ok") == before + 1


def test_known_user_without_precomputed_preference_generates_from_stored_history(client, app):
    before = metric(app, GENERATIONS, outcome="ok")
    body = client.post("/rerank", json={"user_id": "u27", "top_n": 3}).json()  # users 25..29: no preference
    assert body["preference_source"] == "history" and "preference_pending" in body["degraded"]
    assert _wait_for(lambda: _cached(client, {"user_id": "u27", "top_n": 3}))
    assert metric(app, GENERATIONS, outcome="ok") == before + 1


def test_a_full_queue_drops_the_generation_not_the_request(client, app):
    state = app.state.service.preferences
    dropped = metric(app, GENERATIONS, outcome="dropped")
    size = state.queue_size
    state.queue_size = 0  # as if 0 slots were free
    try:
        body = client.post("/rerank", json={"user_id": "new-full-1", "history": HISTORY, "top_n": 3}).json()
    finally:
        state.queue_size = size
    assert body["preference_source"] == "history" and "preference_pending" not in body["degraded"]
    assert len(body["results"]) == 3 and metric(app, GENERATIONS, outcome="dropped") == dropped + 1
    assert metric(app, "dpo4rec_preference_queue") >= 0


def _wait_for(predicate, timeout_s: float = 60.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def test_redis_down_degrades_and_recovers(client, app):
    server = app.state.service.redis_server
    assert server is not None, "the session app runs the embedded Redis"
    run_async(client, server.stop)
    try:
        for user in ("u8", "new-outage-1"):
            payload = {"user_id": user, "history": HISTORY if user.startswith("new") else None, "top_n": 3}
            response = client.post("/rerank", json=payload)
            assert response.status_code == 200, response.text
            assert "cache_unavailable" in response.json()["degraded"]
            assert len(response.json()["results"]) == 3
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"]["ok"] is False
    finally:
        run_async(client, server.start)

    def healthy() -> bool:
        body = client.post("/rerank", json={"user_id": "u8", "top_n": 3}).json()
        return "cache_unavailable" not in body["degraded"]

    assert _wait_for(healthy), "the cache is used again after Redis restarts"
    assert client.get("/readyz").status_code == 200


def test_tiny_deadline_for_a_new_user_goes_on_without_waiting(client, app):
    body = client.post(
        "/rerank", json={"user_id": "new-hurry-1", "history": HISTORY, "top_n": 4, "deadline_ms": 1}
    ).json()
    assert {"preference_pending", "llm_timeout"} <= set(body["degraded"])
    assert body["preference_source"] == "history"
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]  # retriever order

    # the generation went on in the background and filled the cache for the next request
    def cached() -> bool:
        again = client.post("/rerank", json={"user_id": "new-hurry-1", "history": HISTORY, "top_n": 1}).json()
        return again["preference_source"] == "cache"

    assert _wait_for(cached, timeout_s=30)


def test_a_miss_encodes_its_stand_in_only_for_a_retriever_that_reads_it(client, app):
    state = app.state.service.preferences
    calls: list[list[str]] = []
    encode = state.encoder.encode
    state.encoder.encode = lambda texts: calls.append(list(texts)) or encode(texts)  # the real encoder, counted
    try:
        body = {"user_id": "new-plain-1", "history": HISTORY, "top_n": 3}
        assert client.post("/rerank", json=body).json()["preference_source"] == "history"
        assert len(calls) == 1  # this app's retriever fuses preference vectors: the stand-in is encoded
        state.stand_in_vector = False  # as for plain SASRec (pref_dim 0): nothing would read the vector
        answer = client.post("/rerank", json=body | {"user_id": "new-plain-2"}).json()
    finally:
        state.stand_in_vector = True
        del state.encoder.encode
    assert answer["preference_source"] == "history" and len(answer["results"]) == 3
    assert len(calls) == 1  # no encode for the second miss
