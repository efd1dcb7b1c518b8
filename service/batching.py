"""Concurrent calls of a batched function coalesced into one call: the retriever's user vectors under load.

The retriever's forward pass for one user costs ~5 ms on the API's one torch thread, almost all of it
per-call overhead (py-spy under a concurrency-16 load: half of the API process's CPU). Under load many
requests want it at once; one forward pass over all of them costs little more than one. A call that
finds the function idle runs at once, alone (no added wait when the service is quiet); calls that arrive
while it runs wait and go together in the next batch (at most ``max_batch``), in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, fn: Callable[[Sequence[T]], np.ndarray], max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn = fn  # items -> one row per item
        self.max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[np.ndarray]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            batch = [(item, f) for item, f in batch if not f.done()]  # a cancelled caller no longer waits
            if not batch:
                continue
            try:
                rows = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as e:  # every caller of this batch sees the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), row in zip(batch, rows, strict=True):
                if not f.done():
                    f.set_result(row)
