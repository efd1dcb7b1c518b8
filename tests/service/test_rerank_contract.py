"""The /rerank contract on the real app: shape, ordering, top_n, index semantics, options, the /v1 alias."""

from __future__ import annotations

import pytest

from tests.service.support import VERSION


def _scores_sorted(results: list[dict]) -> bool:
    scores = [r["relevance_score"] for r in results]
    return all(a >= b for a, b in zip(scores, scores[1:], strict=False))


def test_known_user_retrieval_shape(client):
    response = client.post("/rerank", json={"user_id": "u1", "top_n": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == VERSION
    assert body["request_id"] and response.headers["x-request-id"] == body["request_id"]
    assert len(body["results"]) == 5
    assert _scores_sorted(body["results"])
    assert all(0.0 <= r["relevance_score"] <= 1.0 for r in body["results"])
    assert body["degraded"] == []
    assert body["preference_source"] in ("cache", "run")
    assert {"preference", "retrieve", "rerank", "total"} <= set(body["timings_ms"])
    assert body["preference"] is None and all(r["item"] is None for r in body["results"])
    # retrieved candidates exclude what the user has seen
    seen = set(client.app.state.service.artifacts.users["u1"])
    catalog = client.app.state.service.artifacts.catalog
    assert not {catalog.index_of(r["item_id"]) for r in body["results"]} & seen


def test_given_candidates_index_is_position_in_request(client):
    candidates = ["101", "105", "110", "120", "130", "140", "150", "160", "111", "112", "113", "114"]
    body = client.post("/rerank", json={"user_id": "u2", "candidates": candidates}).json()
    results = body["results"]
    assert len(results) == 10  # the service's default top_n
    for r in results:
        assert candidates[r["index"]] == r["item_id"]
    assert _scores_sorted(results)
    # rerank_k = 8: the first 8 are re-ranked by probability (summing to 1), the rest stay below in order
    all_results = client.post("/rerank", json={"user_id": "u2", "candidates": candidates, "top_n": 50}).json()
    ranked = all_results["results"]
    assert len(ranked) == len(candidates)
    head = [r for r in ranked if r["index"] < 8]
    tail = [r for r in ranked if r["index"] >= 8]
    assert ranked[:8] == head and [r["index"] for r in tail] == [8, 9, 10, 11]
    assert sum(r["relevance_score"] for r in head) == pytest.approx(1.0, abs=1e-4)
    assert max(r["relevance_score"] for r in tail) < min(r["relevance_score"] for r in head)


def test_metadata_and_explanation(client):
    body = client.post("/rerank", json={"user_id": "u3", "top_n": 3, "return_items": True, "explain": True}).json()
    item = body["results"][0]["item"]
    assert set(item) == {"title", "genres", "year"} and item["title"] and isinstance(item["genres"], list)
    assert body["preference"].startswith("Likes ")  # the run's precomputed text for u3


def test_v1_alias_and_integer_ids(client):
    response = client.post("/v1/rerank", json={"user_id": "u4", "candidates": [101, 102, 103], "top_n": 2})
    assert response.status_code == 200, response.text
    assert [r["item_id"] in ("101", "102", "103") for r in response.json()["results"]] == [True, True]


def test_request_id_is_honoured(client):
    response = client.post("/rerank", json={"user_id": "u5", "top_n": 1}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["request_id"] == "abc-123"


def test_openapi_documents_both_routes_with_examples(client):
    spec = client.get("/openapi.json").json()
    assert {"/rerank", "/v1/rerank", "/livez", "/readyz", "/metrics"} <= set(spec["paths"])
    request = spec["components"]["schemas"]["RerankRequest"]
    assert request.get("examples"), "the request model carries OpenAPI examples"
    assert spec["components"]["schemas"]["RerankResponse"].get("examples")
    assert "422" in spec["paths"]["/rerank"]["post"]["responses"]


def test_new_items_with_text_are_scored_and_unknown_ids_without_text_are_named(client):
    new = [
        {"id": "new-1", "title": "Silent Harbour (2031)", "categories": ["Drama"], "year": 2031},
        {"id": "new-2", "title": "Iron Comedy Night", "categories": ["Comedy", "Action"]},
    ]
    body = {"user_id": "u6", "candidates": ["150", *new, "141"], "top_n": 4, "return_items": True}
    answer = client.post("/rerank", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["degraded"] == [] and {r["item_id"] for r in result["results"]} == {"150", "new-1", "new-2", "141"}
    by_id = {r["item_id"]: r for r in result["results"]}
    assert by_id["new-1"]["item"] == {"title": "Silent Harbour (2031)", "genres": ["Drama"], "year": 2031}
    assert by_id["new-2"]["index"] == 2 and 0 < by_id["new-2"]["relevance_score"] <= 1  # scored by the LLM
    # a known id may come with text too (the catalog's own text is used); an unknown id without text is a 422
    mixed = {"user_id": "u6", "candidates": ["150", {"id": "141", "title": "ignored"}, "no-such-item"]}
    refused = client.post("/rerank", json=mixed)
    assert refused.status_code == 422 and "'no-such-item'" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "candidates"
    duplicate = client.post("/rerank", json={"user_id": "u6", "candidates": ["150", {"id": "150", "title": "x"}]})
    assert duplicate.status_code == 422 and duplicate.json()["error"]["type"] == "duplicate_items"
