"""Admission by predicted completion: LLM work is admitted only when it can finish inside its deadline.

On a CPU, prefill is compute-bound: the engine works through prompt tokens at a roughly fixed rate,
and concurrent requests share that rate instead of adding to it (docs/BENCHMARKS.md). So the time a
new re-rank would take is about ``(prompt tokens already admitted and not finished + its own) / rate``.
A request whose LLM stage would not finish inside its remaining deadline skips the LLM at once
(``llm_shed``) and is answered from the retriever, instead of queueing work that would be thrown away
and making every later request late too.

The rate is a moving estimate in prompt tokens per second of engine busy time: seeded by a measurement
at start (``LanguageModel.measure_rate``), then updated from completed work (an exponential moving
average over samples of at least ``min_sample_s`` of busy time). Work that misses its deadline never
completes, so it cannot correct an optimistic rate; each miss therefore cuts the rate by ``backoff``
(completed work raises it again): without that, an engine slowed by other load (the service's own
retrieval under a burst, a neighbour process) would keep admitting work that times out. The cuts stop at
``floor`` x the rate measured at start: a rate cut so far that nothing is admitted would never see a
completion to raise it again. Background preference generations on the re-rank engine count too (their
prompt plus their generation budget, in the same token units), since they take the same steps; on an
engine of their own, niced below the re-rank engine, they are not counted (``LanguageModel._accounted``).
Either way they do not teach the rate. A generation's budget counts one token per generated token, yet each
is a whole engine step: alone in the engine, a preference (40 tokens, 4-5 s on the AVX2 machine) reads as
a few dozen tokens/s against ~450 for re-rank prompts, and a rate learnt from a stream of them shed every
re-rank (the fault drill of 2026-12-04, docs/BENCHMARKS.md). Next to re-ranks its decode steps ride in
their steps almost free; a re-rank busy period that overlaps one still counts the time its prompt took.

``queue_s`` (the ``admission_queue_ms`` setting) bounds the predicted time admitted work may wait behind,
below the deadline. Under sustained load there is always a new request to admit the moment room opens,
so admitting up to the deadline keeps the engine's queue at the deadline's edge, where any error in the
rate makes the newest admission late: its work is computed and thrown away. A queue somewhat shorter than
the deadline keeps the engine as busy (the next prompts are already waiting when a step ends) while each
admitted prompt keeps a margin (2 s against a 3 s deadline, measured in docs/DECISIONS.md).

``admit`` counts the tokens it admits at once (a ``Ticket``): requests checked in the same instant, as a
coalesced retrieval releases them, each see the work admitted before them.

With ``slots`` (the ``engine_slots`` setting; off by default), admitted re-rank prompts wait in the
service, not in the engine: ``engine_slot`` lets ``slots`` of them into the engine at once and the rest
queue here in arrival order; a prompt whose turn comes too late to finish inside its deadline gives up
(``Late``) before the engine has spent anything on it, where an engine fed its whole queue would compute
part of it only to have it cancelled. Measured 2026-12-03 with 2 slots (and 512-token engine steps):
goodput fell at concurrency 4 and 16 (docs/BENCHMARKS.md), so the engine queues everything by default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager


class Late(Exception):
    """An admitted prompt's turn in the engine came too late for it to finish inside its deadline."""


class Ticket:
    """Tokens of admitted work, counted in ``Admission.pending`` from the moment they are admitted until each
    part finishes or is given up, so that requests checked in the same instant see each other's work. A
    context manager: leaving it gives back whatever was not settled (prompts that never ran)."""

    def __init__(self, admission: Admission, tokens: int):
        self._admission = admission
        self.tokens = tokens  # not yet settled

    def settle(self, tokens: int) -> None:
        n = min(tokens, self.tokens)
        self.tokens -= n
        self._admission.pending -= n

    def release(self) -> None:
        self.settle(self.tokens)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    def __init__(
        self,
        rate: float,
        alpha: float = 0.3,
        min_sample_s: float = 0.25,
        headroom: float = 1.0,
        backoff: float = 0.8,
        floor: float = 0.5,
        slots: int | None = None,
        queue_s: float | None = None,
    ):
        if rate <= 0:
            raise ValueError(f"the initial rate must be > 0 tokens/s, got {rate}")
        self.rate = float(rate)  # prompt tokens per second of busy engine
        self.alpha = alpha
        self.min_sample_s = min_sample_s
        self.headroom = headroom  # predicted time x headroom must fit the deadline (>1: more cautious)
        self.backoff = backoff  # the rate is multiplied by this on each deadline miss ...
        self.floor = floor  # ... down to floor x the measured (seed) rate at most
        self.seeded = self.rate
        # the most predicted engine time admitted work may wait behind (None: the whole remaining deadline)
        self.queue_s = queue_s
        self.pending = 0  # tokens of admitted work not finished (waiting here or in the engine)
        self.in_engine = 0  # of which the engine has
        self._running = 0  # prompts between start and finish (waiting for a slot or in the engine)
        # re-rank prompts in the engine at once (None: no limit, the engine queues them)
        self._gate = asyncio.Semaphore(slots) if slots else None
        self._sample_start: float | None = None
        self._sample_tokens = 0

    def predicted_s(self, tokens: int) -> float:
        """Seconds until work of ``tokens`` admitted now would finish, behind what is pending."""
        return (self.pending + tokens) / self.rate

    def admits(self, tokens: int, remaining_s: float) -> bool:
        limit = remaining_s if self.queue_s is None else min(remaining_s, self.queue_s)
        return self.predicted_s(tokens) * self.headroom <= limit

    def admit(self, tokens: int, remaining_s: float) -> Ticket | None:
        """Admit work of ``tokens`` if it would finish in time, counting it as pending at once (a check and a
        count apart would let a burst of requests, checked before any of them is counted, all in); None: shed."""
        return self.hold(tokens) if self.admits(tokens, remaining_s) else None

    def hold(self, tokens: int) -> Ticket:
        """Count ``tokens`` as pending now, without a check (background work)."""
        self.pending += tokens
        return Ticket(self, tokens)

    def seed(self, rate: float) -> None:
        """The rate measured on the idle engine at start: the estimate, and the reference of ``floor``."""
        self.rate = self.seeded = float(rate)

    def missed(self) -> None:
        """Admitted work missed its deadline: the rate was optimistic (never cut below ``floor`` x seed)."""
        self.rate = max(self.rate * self.backoff, self.floor * self.seeded)

    @contextmanager
    def running(self, tokens: int, ticket: Ticket | None = None, teaches: bool = True) -> Iterator[None]:
        """Account for a prompt of ``tokens`` while it runs (part of ``ticket`` when admitted, counted from now
        otherwise); completed work updates the rate, cancelled work does not. ``teaches=False`` (a background
        generation): pending while it runs, but it neither opens a busy period nor enters a rate sample."""
        ticket = ticket or self.hold(tokens)
        if teaches:
            if self._running == 0:  # a busy period starts: idle time never enters a rate sample
                self._sample_start, self._sample_tokens = time.perf_counter(), 0
            self._running += 1
        completed = False
        try:
            yield
            completed = True
        finally:
            ticket.settle(tokens)
            if teaches:
                self._running -= 1
                if completed:
                    self._observe(tokens)

    @asynccontextmanager
    async def engine_slot(self, tokens: int, deadline: float | None = None) -> AsyncIterator[None]:
        """Wait (in arrival order) until the engine has a free slot; then, if the work can no longer finish
        by ``deadline`` (``time.perf_counter()`` seconds) behind what the engine has, raise ``Late``."""
        if self._gate is None:
            yield
            return
        async with self._gate:
            if deadline is not None and (self.in_engine + tokens) / self.rate > deadline - time.perf_counter():
                raise Late(f"{tokens} tokens behind {self.in_engine} at {self.rate:.0f} tokens/s miss the deadline")
            self.in_engine += tokens
            try:
                yield
            finally:
                self.in_engine -= tokens

    def _observe(self, tokens: int) -> None:
        now = time.perf_counter()
        self._sample_tokens += tokens
        start = self._sample_start if self._sample_start is not None else now
        busy = now - start
        if busy >= self.min_sample_s:
            self.rate = (1 - self.alpha) * self.rate + self.alpha * (self._sample_tokens / busy)
            self._sample_start, self._sample_tokens = now, 0
