"""Preferences: cache miss then hit, ONE generation for concurrent requests, Redis outage and recovery."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.service.support import metric, run_async

HISTORY = ["101", "104", "109", "115", "122"]
GENERATIONS = "dpo4rec_preference_generations_total"
CACHE = "dpo4rec_preference_cache_lookups_total"


def test_cache_miss_then_hit_for_a_new_user(client, app):
    misses, hits = metric(app, CACHE, result="miss"), metric(app, CACHE, result="hit")
    first = client.post("/rerank", json={"user_id": "new-cache-1", "history": HISTORY, "explain": True}).json()
    assert first["preference_source"] == "generated" and first["degraded"] == []
    assert metric(app, CACHE, result="miss") == misses + 1
    second = client.post("/rerank", json={"user_id": "new-cache-1", "history": HISTORY, "explain": True}).json()
    assert second["preference_source"] == "cache"
    assert metric(app, CACHE, result="hit") == hits + 1
    assert second["preference"] == first["preference"]


def test_known_user_without_cache_entry_uses_the_run(client, app):
    state = app.state.service
    run_async(client, lambda: state.cache.client.delete(state.cache.key("u7")))
    body = client.post("/rerank", json={"user_id": "u7", "top_n": 3}).json()
    assert body["preference_source"] == "run"
    # and it was written back: the next request hits the cache
    assert client.post("/rerank", json={"user_id": "u7", "top_n": 3}).json()["preference_source"] == "cache"


def test_concurrent_requests_for_one_new_user_cause_one_generation(client, app):
    before = metric(app, GENERATIONS, outcome="ok")

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            body = {"user_id": "new-burst-1", "history": HISTORY, "top_n": 3}
            return list(await asyncio.gather(*(http.post("/rerank", json=body) for _ in range(8))))

    responses = run_async(client, burst)
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.json()["preference_source"] for r in responses} == {"generated"}
    assert metric(app, GENERATIONS, outcome="ok") == before + 1


def test_known_user_without_precomputed_preference_generates_from_stored_history(client, app):
    before = metric(app, GENERATIONS, outcome="ok")
    body = client.post("/rerank", json={"user_id": "u27", "top_n": 3}).json()  # users 25..29: no preference
    assert body["preference_source"] == "generated"
    assert metric(app, GENERATIONS, outcome="ok") == before + 1


def _wait_for(predicate, timeout_s: float = 10.0, every_s: float = 0.1):
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
    assert {"preference_timeout", "llm_timeout"} <= set(body["degraded"])
    assert body["preference_source"] == "none"
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]  # retriever order

    # the generation went on in the background and filled the cache for the next request
    def cached() -> bool:
        again = client.post("/rerank", json={"user_id": "new-hurry-1", "history": HISTORY, "top_n": 1}).json()
        return again["preference_source"] == "cache"

    assert _wait_for(cached, timeout_s=30)
