"""Schemathesis-generated requests from the app's own OpenAPI schema: no 5xx, documented statuses only.

Cases are generated from the schema (``schemathesis.openapi.from_dict``) and sent through the
session's ``TestClient`` so they reach the real app (real engine, real Redis) on its event loop.
A bounded number of examples keeps it fast.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

EXAMPLES = 50


def test_generated_requests_never_get_a_5xx(client):
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    operation = schema["/rerank"]["POST"]
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        kwargs.pop("cookies", None)
        response = client.request(**kwargs)
        statuses.append(response.status_code)
        assert response.status_code < 500, (kwargs.get("json"), response.text)
        documented = {int(code) for code in operation.definition.raw["responses"]}
        assert response.status_code in documented, (response.status_code, response.text)
        if response.status_code == 200:
            scores = [r["relevance_score"] for r in response.json()["results"]]
            assert scores == sorted(scores, reverse=True)

    check()
    assert len(statuses) >= 10
