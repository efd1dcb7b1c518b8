"""API keys, the in-flight cap (429 + Retry-After) and the body limit, on a second app.

The second app runs without the LLM (``llm_enabled=False``: quick to start) with one API key,
``max_in_flight=1`` and a 4 KiB body limit. A request is held in flight deterministically by streaming
its body slowly: the cap counts it from the moment it arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from tests.service.support import API_KEY, run_async

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_no_key_wrong_key_and_right_key(lite_client):
    missing = lite_client.post("/rerank", json={"user_id": "u1"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]["message"]
    wrong = lite_client.post("/rerank", json={"user_id": "u1"}, headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    assert API_KEY not in wrong.text
    ok = lite_client.post("/rerank", json={"user_id": "u1", "top_n": 3}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert ok.json()["degraded"] == ["llm_disabled"] and len(ok.json()["results"]) == 3


def test_auth_is_checked_before_the_body_is_parsed(lite_client):
    response = lite_client.post("/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 401


def test_probes_need_no_key(lite_client):
    assert lite_client.get("/livez").status_code == 200
    ready = lite_client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["engine"]["detail"].startswith("disabled")


def test_keyless_app_needs_no_key(client):
    assert client.post("/rerank", json={"user_id": "u1", "top_n": 1}).status_code == 200


def test_in_flight_cap_answers_429_with_retry_after(lite_client, lite_app):
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'{"user_id": "u1",'
            await release.wait()
            yield b' "top_n": 2}'

        transport = httpx.ASGITransport(app=lite_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as http:
            held = asyncio.create_task(
                http.post("/rerank", content=slow_body(), headers={"content-type": "application/json"})
            )
            limiter = lite_app.state.limiter
            for _ in range(200):  # until the first request is counted in flight
                if limiter.count == 1:
                    break
                await asyncio.sleep(0.01)
            refused = await http.post("/rerank", json={"user_id": "u2"})
            release.set()
            return await held, refused

    held, refused = run_async(lite_client, scenario)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert held.status_code == 200, held.text
    assert lite_app.state.limiter.count == 0
    # probes are never capped
    assert lite_client.get("/livez").status_code == 200


def test_streamed_body_over_the_limit_is_413(lite_client, lite_app):
    async def scenario() -> httpx.Response:
        async def big_body() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            yield b'{"user_id": "u1", "history": ['
            for _ in range(1000):
                yield b'"101",'
            yield b'"101"]}'

        transport = httpx.ASGITransport(app=lite_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as http:
            return await http.post("/rerank", content=big_body(), headers={"content-type": "application/json"})

    response = run_async(lite_client, scenario)
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"
