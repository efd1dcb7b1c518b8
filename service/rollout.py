"""Model rollout without downtime: a new run version loaded beside the served one, probed, swapped, drained.

After TensorFlow Serving's version policy and Triton's model repository polling: the service serves a run
root (``rundir.versions``); when its ``current`` pointer moves (seen by a poll, or ``POST /admin/reload``),
``Rollout.reload`` opens the new version beside the old (``service.runtime.open_version``: its artifacts,
cache keys, preference service and pipeline; the engines only if its LLM weights differ, else the served
ones are shared), answers a probe request with it, and swaps ``app.state.service`` in one assignment. A
request holds the state it started with, so in-flight requests finish on the old version; once its
in-flight count is zero the old version is closed and its memory freed. A version that fails to load or
to answer the probe is refused: the old one keeps serving, and the refusal is logged, counted in
``/metrics`` (``dpo4rec_reloads_total{outcome}``) and shown by ``/readyz``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rundir.versions import resolve
from service.protocol import RerankRequest
from service.runtime import ServiceState, open_version
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """``gc.freeze()``: what is alive now (the engines' and torch's objects, a version's artifacts) moves to the
    permanent generation, which the cyclic collector never walks. With ~840,000 tracked objects a full collection
    took 0.7 s on the event loop, and the allocations of a version swap set one off (a 0.75 s stall in the first
    2 s after one swap of three in the rollout drill, docs/BENCHMARKS.md). Frozen objects are still freed by
    their reference counts when a version is closed; only reference cycles among them would stay."""
    gc.freeze()


@dataclass
class ReloadOutcome:
    outcome: str  # "swapped" | "unchanged" | "refused" | "busy"
    version: str  # the version served after it
    detail: str = ""
    seconds: float = 0.0


class Rollout:
    """Owns the versions the service has open after the first, the poll of ``current``, and the swaps."""

    def __init__(self, app: Any, settings: Settings, metrics: ServiceMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self._lock = asyncio.Lock()  # one reload at a time
        self._stacks: dict[str, AsyncExitStack] = {}  # version dir -> what that version owns (not the first)
        self._poll: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self.last_refusal: str | None = None  # the newest refused version and why, for /readyz

    @property
    def state(self) -> ServiceState:
        state: ServiceState = self.app.state.service
        return state

    def start(self) -> None:
        if self.settings.reload_poll_s:
            self._poll = asyncio.create_task(self._watch(self.settings.reload_poll_s), name="rollout-poll")

    async def _watch(self, every_s: float) -> None:
        """Reload whenever the run root's ``current`` points at another version than the one served."""
        while True:
            await asyncio.sleep(every_s)
            try:
                if resolve(self.settings.run_dir).resolve() != self.state.artifacts.root.resolve():
                    await self.reload()
            except Exception:  # noqa: BLE001  # the poll must outlive a bad version: reload() reports it
                log.exception("rollout: poll failed")

    async def reload(self) -> ReloadOutcome:
        """Load ``current`` beside the served version, probe it, swap; refuse it on any failure."""
        if self._lock.locked():
            return ReloadOutcome("busy", self.state.artifacts.version, "a reload is already running")
        async with self._lock:
            begin = time.perf_counter()
            old = self.state
            try:
                # the real folder: a run root's current, or a symlink such as /runs/current moved by a training job
                target = resolve(self.settings.run_dir).resolve()
            except Exception as e:  # noqa: BLE001  # a broken pointer is a refusal, never a crash
                return self._refused(str(target_name(self.settings.run_dir)), str(e), begin)
            if target == old.artifacts.root.resolve():
                return ReloadOutcome("unchanged", old.artifacts.version)
            stack = AsyncExitStack()
            try:
                new = await stack.enter_async_context(open_version(self.settings, self.metrics, target, old))
                await self._probe(new)
            except Exception as e:  # noqa: BLE001  # load or probe failed: the old version keeps serving
                await stack.aclose()
                return self._refused(target.name, f"{type(e).__name__}: {e}", begin)
            self._stacks[str(target)] = stack
            self.app.state.service = new  # the swap: requests from now on get the new version
            if self.settings.gc_freeze:
                freeze_heap()  # the new version's objects join the long-lived ones no collection walks
            self.metrics.reloads.labels(outcome="swapped").inc()
            self.metrics.served_version.info({"version": new.artifacts.version})
            task = asyncio.create_task(self._drain_and_close(old), name=f"drain-{old.artifacts.version}")
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
            seconds = time.perf_counter() - begin
            log.info("rollout: now serving %s (was %s; %.1f s)", new.artifacts.version, old.artifacts.version, seconds)
            return ReloadOutcome("swapped", new.artifacts.version, seconds=seconds)

    async def _probe(self, state: ServiceState) -> None:
        """One real request through the new version's pipeline: a user of the run, its retrieval and ranking."""
        user = next(iter(state.artifacts.users), None)
        if user is None:
            raise RuntimeError("the run has no users to probe with")
        probe = RerankRequest.model_validate({"user_id": user, "top_n": 5})
        answer = await state.pipeline.rerank(probe, "rollout-probe")
        if not answer.results or answer.model_version != state.artifacts.version:
            raise RuntimeError(f"the probe got {len(answer.results)} results from {answer.model_version}")

    def _refused(self, name: str, why: str, begin: float) -> ReloadOutcome:
        self.last_refusal = f"{name}: {why}"
        self.metrics.reloads.labels(outcome="refused").inc()
        log.error("rollout: refused %s, still serving %s: %s", name, self.state.artifacts.version, why)
        return ReloadOutcome("refused", self.state.artifacts.version, why, time.perf_counter() - begin)

    async def _drain_and_close(self, old: ServiceState) -> None:
        """Wait for the old version's in-flight requests (up to ``drain_timeout_s``), then free what it owns."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stack = self._stacks.pop(str(old.artifacts.root), None) or old.closer
        if stack is not None:  # its preference service, cache client, and its lease on the engines
            await stack.aclose()
        log.info("rollout: closed %s (%d requests still in flight)", old.artifacts.version, old.in_flight)

    async def close(self) -> None:
        """Stop polling, finish drains, close every version but the first (the lifespan closes that one)."""
        if self._poll is not None:
            self._poll.cancel()
            with suppress(asyncio.CancelledError):
                await self._poll
        for task in list(self._drains):
            with suppress(Exception):
                await task
        for stack in reversed(list(self._stacks.values())):
            await stack.aclose()
        self._stacks.clear()


def target_name(run_dir: Path) -> Path:
    return Path(run_dir) / "current"
