"""Concurrent calls coalesced into one batched call; a quiet call runs alone; errors reach every caller."""

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from service.batching import Coalescer


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
