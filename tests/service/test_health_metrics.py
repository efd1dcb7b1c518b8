"""/livez, /readyz (each check reported) and /metrics (Prometheus text with the service's series)."""

from __future__ import annotations

from tests.service.support import VERSION


def test_livez(client):
    response = client.get("/livez")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_every_check(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True and body["model_version"] == VERSION
    assert set(body["checks"]) == {"artifacts", "engine", "rerank", "redis", "accepting"}
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
