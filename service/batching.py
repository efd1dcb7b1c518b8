"""Concurrent calls of a batched function coalesced into one call: the retriever's user vectors under load.

The retriever's forward pass for one user costs ~0.5 ms of CPU on the API's one torch thread (a tight loop;
2-3x that between sparse requests on shared cores), almost all of it per-call overhead (~40 module calls
for a 2-layer model); a batch of 16 costs ~3 ms, not 16 x 0.5. Under load many requests want it at once.
A call that finds the function idle runs at once, alone (no added wait when the service is quiet); calls
that arrive while it runs wait and go together in the next batch (at most ``max_batch``), in a worker
thread, so the event loop keeps reading requests meanwhile. Running the batches on the event loop instead
(no thread hop) was measured worse: more CPU per answer and 4x the p50 latency (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[Sequence[T]], Iterable[R]],
        max_batch: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn = fn  # items -> one result per item, in order
        self.max_batch = max_batch
        self.on_batch = on_batch  # told each batch's size (a metric)
        self.batches = 0  # batches run, and the calls they served: their ratio is the mean batch size
        self.calls = 0
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
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
                rows = list(await asyncio.to_thread(self.fn, [item for item, _ in batch]))
            except Exception as e:  # every caller of this batch sees the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.calls += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for (_, f), row in zip(batch, rows, strict=True):
                if not f.done():
                    f.set_result(row)
