"""Known failures answer 4xx with a message naming the problem, in one envelope; never a 5xx."""

from __future__ import annotations

import json


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] == response.headers["x-request-id"]
    return body["error"]


def test_unknown_user_without_history_is_422_naming_it(client):
    response = client.post("/rerank", json={"user_id": "stranger-42"})
    assert response.status_code == 422
    error = _error(response)
    assert error["type"] == "unknown_user" and "stranger-42" in error["message"] and error["param"] == "history"
    # an empty history is no history
    assert client.post("/rerank", json={"user_id": "stranger-42", "history": []}).status_code == 422


def test_unknown_candidate_ids_are_named(client):
    response = client.post("/rerank", json={"user_id": "u1", "candidates": ["101", "nope-1", "102", "nope-2"]})
    assert response.status_code == 422
    error = _error(response)
    assert error["type"] == "unknown_items" and error["param"] == "candidates"
    assert "'nope-1'" in error["message"] and "'nope-2'" in error["message"] and "'101'" not in error["message"]


def test_unknown_history_ids_are_named(client):
    response = client.post("/rerank", json={"user_id": "new-x", "history": ["101", "zzz"]})
    assert response.status_code == 422 and "'zzz'" in _error(response)["message"]


def test_duplicate_and_too_many_candidates(client):
    response = client.post("/rerank", json={"user_id": "u1", "candidates": ["101", "102", "101"]})
    assert response.status_code == 422
    assert _error(response)["type"] == "duplicate_items" and "'101'" in _error(response)["message"]
    many = [str(i) for i in range(501)]  # max_candidates = 500
    response = client.post("/rerank", json={"user_id": "u1", "candidates": many})
    assert response.status_code == 422 and _error(response)["type"] == "too_many_items"
    assert "501" in _error(response)["message"] and "500" in _error(response)["message"]


def test_malformed_json_is_422_with_a_readable_message(client):
    response = client.post("/rerank", content=b'{"user_id": "u1", ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = _error(response)
    assert error["type"] == "validation_error" and "not valid JSON" in error["message"]


def test_validation_errors_name_the_field(client):
    response = client.post("/rerank", json={"user_id": "u1", "top_n": 0, "surprise": 1})
    assert response.status_code == 422
    message = _error(response)["message"]
    assert "top_n" in message and "greater than or equal to 1" in message and "surprise" in message
    assert client.post("/rerank", json={"top_n": 3}).status_code == 422  # user_id missing


def test_too_large_body_is_413(client):
    payload = json.dumps({"user_id": "u1", "history": ["101"] * 200_000}).encode()  # > 1 MiB
    response = client.post("/rerank", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 413 and _error(response)["type"] == "body_too_large"


def test_unknown_route_and_method_use_the_envelope(client):
    assert client.get("/nowhere").status_code == 404 and _error(client.get("/nowhere"))["code"] == 404
    assert client.get("/rerank").status_code == 405
