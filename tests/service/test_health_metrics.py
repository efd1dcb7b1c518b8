"""/livez, /readyz (each check reported) and /metrics (Prometheus text with the service's series)."""

from __future__ import annotations

import time

from tests.service.support import VERSION


def test_livez(client):
    response = client.get("/livez")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_every_check(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True and body["model_version"] == VERSION
    assert set(body["checks"]) == {"artifacts", "engine", "rerank", "version", "redis", "accepting"}
    assert body["checks"]["version"] == {"ok": True, "detail": f"serving {VERSION}"}
    assert body["checks"]["engine"] == {"ok": True, "detail": "alive"}
    assert body["checks"]["redis"]["detail"].startswith("embedded")


def test_metrics_expose_requests_stages_cache_and_engine(client):
    client.post("/rerank", json={"user_id": "u1", "top_n": 2})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        'dpo4rec_http_requests_total{endpoint="/rerank",method="POST",status="200"}',
        'dpo4rec_http_request_duration_seconds_bucket{endpoint="/rerank"',
        'dpo4rec_stage_duration_seconds_count{stage="rerank"}',
        'dpo4rec_stage_duration_seconds_count{stage="preference"}',
        'dpo4rec_preference_cache_lookups_total{result="hit"}',
        "dpo4rec_in_flight_requests",
        "dpo4rec_engine_unfinished_requests",
        'dpo4rec_llm_requests_in_flight{job="rerank"}',
        "dpo4rec_rerank_prompt_tokens_bucket",
        "dpo4rec_engine_token_rate",
        "dpo4rec_preference_queue",
    ):
        assert name in text, name
    # the engine's own counters (llm.engine.EngineCounters): it has taken in prompt tokens, looked them up in
    # the prefix cache, and found some there (the system prompt is shared by every re-rank)
    value = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("dpo4rec_engine_")
    }
    assert value["dpo4rec_engine_prompt_tokens"] > 0 and value["dpo4rec_engine_prefix_queries"] > 0
    assert 0 < value["dpo4rec_engine_prefix_hits"] <= value["dpo4rec_engine_prefix_queries"]


def _engine_prompt_tokens(client) -> float:
    text = client.get("/metrics").text
    name = "dpo4rec_engine_prompt_tokens "
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name))


def test_the_engine_takes_in_exactly_the_tokens_the_service_counted(client, app, monkeypatch):
    # the service tokenizes each prompt once, counts it for admission and hands the engine those token ids
    # (the real engine, its generate wrapped to see what it is given): the engine's own count of prompt
    # tokens grows by exactly what the answer reports
    engine = app.state.service.llm.engines["rerank"]
    given: list[object] = []
    real = engine.generate

    def generate(prompt, *args, **kwargs):
        given.append(prompt)
        return real(prompt, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", generate)
    before = _engine_prompt_tokens(client)
    answer = client.post("/rerank", json={"user_id": "u2", "top_n": 3, "deadline_ms": 20_000}).json()
    assert given and all(isinstance(p, dict) for p in given)  # token ids, not a text to tokenize again
    assert sum(len(p["prompt_token_ids"]) for p in given) == answer["prompt_tokens"]  # type: ignore[index]
    assert answer["degraded"] == [] and answer["prompt_tokens"] > 0
    grown = 0.0
    for _ in range(50):  # vLLM records a step's statistics just after it hands out the step's outputs
        grown = _engine_prompt_tokens(client) - before
        if grown >= answer["prompt_tokens"]:
            break
        time.sleep(0.1)
    assert grown == answer["prompt_tokens"]
