"""Concurrent calls coalesced into one batched call; a quiet call runs alone; errors reach every caller; the
service's retrieval batched under concurrency, each request with its own answer."""

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from service.batching import Coalescer
from tests.service.support import run_async


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_row() -> None:
    calls: list[list[int]] = []

    def double(items: Sequence[int]) -> np.ndarray:
        calls.append(list(items))
        return np.array([[2 * i] for i in items])

    async def scenario() -> list[np.ndarray]:
        c = Coalescer(double, max_batch=3)
        alone = await c(7)  # a quiet service: runs at once, alone
        rows = await asyncio.gather(*(c(i) for i in range(5)))
        return [alone, *rows]

    rows = asyncio.run(scenario())
    assert [int(r[0]) for r in rows] == [14, 0, 2, 4, 6, 8]
    assert calls[0] == [7] and len(calls) <= 4 and max(len(b) for b in calls) <= 3 and len(calls[1]) > 1


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    def fail_on_negative(items: Sequence[int]) -> np.ndarray:
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return np.array([[i] for i in items])

    async def scenario() -> tuple[list[object], np.ndarray]:
        c = Coalescer(fail_on_negative)
        outcomes = await asyncio.gather(c(-1), c(1), return_exceptions=True)
        return list(outcomes), await c(3)

    outcomes, after = asyncio.run(scenario())
    assert all(isinstance(o, ValueError) for o in outcomes) and int(after[0]) == 3
    with pytest.raises(ValueError):
        Coalescer(fail_on_negative, max_batch=0)


def test_concurrent_retrievals_share_a_forward_pass_and_each_gets_its_own_items(client, app) -> None:
    """The service's retrieval (SASRec user vector + FAISS top k, ``RerankPipeline._retrieve``): requests that
    ask at once go through one batch, and each gets what it would have got alone."""
    state = app.state.service
    pipeline, artifacts = state.pipeline, state.artifacts
    queries = []
    for user in sorted(artifacts.users)[:12]:
        row = artifacts.preference_rows.get(user)
        queries.append((artifacts.users[user], None if row is None else artifacts.preference_vectors[row]))

    async def one_at_a_time() -> list[tuple[list, np.ndarray]]:
        return [await pipeline._retrieve(history, vector, 10) for history, vector in queries]

    async def together() -> list[tuple[list, np.ndarray]]:
        return list(await asyncio.gather(*(pipeline._retrieve(history, vector, 10) for history, vector in queries)))

    batches = pipeline._search.batches
    alone = run_async(client, one_at_a_time)
    assert pipeline._search.batches - batches == len(queries)
    batches = pipeline._search.batches
    at_once = run_async(client, together)
    assert pipeline._search.batches - batches < len(queries), "concurrent retrievals were not batched"
    for (found_alone, scores_alone), (found, scores), (history, _) in zip(alone, at_once, queries, strict=True):
        assert [c.item_id for c in found] == [c.item_id for c in found_alone]
        np.testing.assert_allclose(scores, scores_alone, rtol=1e-4, atol=1e-5)
        assert not {c.index for c in found} & set(history), "a seen item came back"
