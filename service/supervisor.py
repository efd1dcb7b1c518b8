"""The engine supervisor: the service's vLLM engines started, watched, and restarted with back-off when one dies.

SPEC section 9 ("Lifecycle"): a dead engine is restarted with back-off while the retriever answers (flagged
``llm_unavailable``); ``/readyz`` stays 200, since the pod still answers correctly, and ``/livez`` fails only once
the restarts keep failing, so Kubernetes restarts the pod then. The back-off follows kubelet's crash-loop back-off
(doubled after each failure, capped, forgotten once a start has run for the cap).

- **Seeing a death.** vLLM's ``AsyncLLM`` watches its engine-core process (a thread on the process's sentinel)
  and marks itself errored within milliseconds of a crash (``llm.engine.engine_alive``); it never recovers, every
  call fails with ``EngineDeadError``. The supervisor looks every ``CHECK_INTERVAL_S`` (two attribute reads).
- **Restarting.** The dead engine is shut down first (its sockets and any process left), then, after the
  back-off, a new one is built from the same ``EngineConfig`` with the same counters (``/metrics`` stays
  cumulative), warmed up, and swapped into the ``LanguageModel`` (``replace_engine``): the calls made from then
  on use it, without any action. Meanwhile a call on the dead engine fails at once (``EngineUnavailable``).
- **Failing.** A start that raises, or an engine that dies sooner than ``backoff_max_s`` after its start, is a
  failure; after ``max_failures`` in a row the supervisor gives up (``failed``): ``/livez`` answers 503.
- **Where engines are built.** On one thread of its own, off the event loop, so a restart (20-50 s on a CPU)
  does not stall the answers the retriever gives meanwhile. The thread exists before the API process lowers its
  own priority and is left out of it (``starter_tid``, ``service.processes``): a process inherits the niceness of
  the thread that starts it, and an engine started from a niced thread could never get its priority back.
- **Admission's rate after a restart: kept.** The new engine is the same configuration on the same machine, and
  the rate admission has learnt from real traffic (``service.admission``) is a better estimate than a probe of
  the idle engine; a probe would also hold the healed engine back from serving for its duration. Failed calls on
  a dead engine never teach the rate (they do not complete, and are not deadline misses).
- **Shutdown.** ``close`` stops the watching and any back-off at once; a build under way is waited for and its
  engine shut down, never swapped in; then every engine is shut down. No restart starts during shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llm.engine import EngineConfig, EngineCounters, awarm_up, engine_alive, make_async_engine
from llm.remote import RemoteEngine, RemoteTarget
from service.processes import descendants, lower_priority
from service.telemetry import ServiceMetrics

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

    from llm.engine import AsyncEngine
    from service.language_model import LanguageModel

log = logging.getLogger(__name__)

State = Literal["alive", "restarting", "failed"]
STATES: tuple[State, ...] = ("alive", "restarting", "failed")
CHECK_INTERVAL_S = 0.5  # how often the engines are looked at; vLLM marks a dead one within milliseconds


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0  # wait before the first restart, doubled after each failure ...
    backoff_max_s: float = 60.0  # ... up to this; an engine dying sooner than this after its start is a failure
    max_failures: int = 5  # failures in a row after which the supervisor gives up (/livez fails)

    def delay(self, failures: int) -> float:
        return float(min(self.backoff_s * 2**failures, self.backoff_max_s))


@dataclass
class SupervisedEngine:
    """One engine: what it is built from, the jobs it serves, and where it stands."""

    config: EngineConfig | RemoteTarget  # an in-process engine's, or the server the job's calls go to
    jobs: tuple[str, ...]  # served by this engine ("preference", "rerank")
    counters: EngineCounters = field(default_factory=EngineCounters)  # kept across restarts
    nice: int = 0  # added to its processes' niceness (an engine that only generates in the background)
    engine: AsyncLLM | RemoteEngine | None = None
    state: State = "alive"
    pids: set[int] = field(default_factory=set)  # its processes (found as the children its start added)
    started_at: float = 0.0  # event-loop time of its last start
    restarts: int = 0
    failures: int = 0  # in a row: failed starts, and engines that died soon after theirs
    attempt: int = 0  # of the restart under way
    next_at: float | None = None  # event-loop time of the next attempt; None while one is under way
    error: str = ""  # the last failure

    def describe(self, now: float) -> str:
        if isinstance(self.engine, RemoteEngine):  # never restarted here: whether its server answers
            return self.engine.describe()
        if self.state == "alive":
            n = self.restarts
            return "alive" if n == 0 else f"alive (restarted {n} time{'s' if n > 1 else ''})"
        if self.state == "restarting":
            when = "starting" if self.next_at is None else f"next in {max(0.0, self.next_at - now):.1f} s"
            return f"restarting (attempt {self.attempt}, {when})"
        return f"failed: {self.failures} failures in a row, the last {self.error}; /livez fails"


class EngineSupervisor:
    """Owns the service's engines (``service.runtime`` closes it): ``start``, then ``watch`` for deaths."""

    def __init__(self, engines: list[SupervisedEngine], policy: RestartPolicy, metrics: ServiceMetrics):
        self.engines = engines
        self.policy = policy
        self.metrics = metrics
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="engine-starter")
        # the thread exists from here on, at this process's priority (the API nices itself later, not this thread)
        self.starter_tid = self._starter.submit(threading.get_native_id).result()
        self._llm: LanguageModel | None = None
        self._watching: asyncio.Task[None] | None = None
        self._heals: set[asyncio.Task[None]] = set()
        self._building: asyncio.Future[AsyncLLM] | None = None  # an engine being built on the starter thread
        self._closing = False
        self._stop = asyncio.Event()  # set by close: ends any back-off at once

    # ---- starting and swapping --------------------------------------------------------------------

    async def start(self) -> dict[str, AsyncEngine]:
        """Start every engine (raising if one cannot start: the service does not come up); job -> engine."""
        for slot in self.engines:
            slot.engine = await self._start(slot)
            self._set_state(slot, "alive")
        return self.jobs()

    def jobs(self) -> dict[str, AsyncEngine]:
        return {job: slot.engine for slot in self.engines if slot.engine is not None for job in slot.jobs}

    def watch(self, llm: LanguageModel) -> None:
        """From now on, restart an engine of ``llm`` that dies and swap the new one into it."""
        self._llm = llm
        self._watching = asyncio.create_task(self._watch(), name="engine-supervisor")

    async def _start(self, slot: SupervisedEngine) -> AsyncLLM | RemoteEngine:
        """Build an engine on the starter thread, find its processes, warm it up (a failure shuts it down); for a
        remote engine, connect to its server and warm it up (the server is the engine tier's to start)."""
        loop = asyncio.get_running_loop()
        if isinstance(slot.config, RemoteTarget):
            remote = RemoteEngine(slot.config.url, slot.config.models, slot.counters, slot.config.api_key)
            try:
                await remote.open(wait_s=slot.config.wait_s)
                await awarm_up(remote)  # type: ignore[arg-type]  # AsyncLLM's calls, over HTTP
            except BaseException:
                await remote.aclose()
                raise
            slot.started_at = loop.time()
            log.info("%s on the engine at %s (%s)", "+".join(slot.jobs), slot.config.url, ", ".join(slot.config.models))
            return remote
        before = descendants()
        building = loop.run_in_executor(self._starter, make_async_engine, slot.config, slot.counters)
        self._building = building
        try:
            engine = await asyncio.shield(building)
        except asyncio.CancelledError:  # the build goes on in its thread: shut its engine down once built
            building.add_done_callback(_shut_down_when_built)
            raise  # (``_building`` stays: ``close`` waits for it)
        except Exception:
            self._building = None
            raise
        self._building = None
        try:
            await awarm_up(engine)
        except BaseException:
            await self._shut_down(engine)
            raise
        slot.pids = descendants() - before
        if slot.nice:
            lower_priority(slot.nice, slot.pids)
            log.info("%s engine's processes niceness +%d", "+".join(slot.jobs), slot.nice)
        slot.started_at = loop.time()
        return engine

    async def _shut_down(self, engine: AsyncLLM | RemoteEngine) -> None:
        """``AsyncLLM.shutdown`` on the starter thread: a live engine's processes may take seconds to stop (a remote
        engine's connections only)."""
        if isinstance(engine, RemoteEngine):
            await engine.aclose()
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._starter, engine.shutdown)
        except Exception as e:  # best effort: what is left of a dead engine
            log.warning("engine shutdown: %s: %s", type(e).__name__, e)

    # ---- watching and healing ---------------------------------------------------------------------

    async def _watch(self) -> None:
        while not self._closing:
            for slot in self.engines:
                if slot.state == "alive" and slot.engine is not None and not engine_alive(slot.engine):
                    task = asyncio.create_task(self._heal_or_fail(slot), name=f"engine-restart:{'+'.join(slot.jobs)}")
                    self._heals.add(task)
                    task.add_done_callback(self._heals.discard)
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def _heal_or_fail(self, slot: SupervisedEngine) -> None:
        """``_heal``; an error of its own fails the engine (``/livez``) rather than leave it restarting forever."""
        try:
            await self._heal(slot)
        except Exception as e:
            log.exception("restarting the %s engine failed", "+".join(slot.jobs))
            slot.error = f"{type(e).__name__}: {e}"[:300]
            self._set_state(slot, "failed")

    async def _heal(self, slot: SupervisedEngine) -> None:
        """Restart a dead engine with back-off until one runs, the failures reach the limit, or the service closes."""
        loop = asyncio.get_running_loop()
        dead, name = slot.engine, "+".join(slot.jobs)
        assert dead is not None and self._llm is not None
        if loop.time() - slot.started_at < self.policy.backoff_max_s:
            slot.failures += 1  # it died soon after its start: a crash loop backs off
            slot.error = "the engine died soon after its start"
        else:
            slot.failures = 0
        slot.attempt, slot.next_at = 1, loop.time() + self.policy.delay(slot.failures)
        self._set_state(slot, "restarting")
        log.error(
            "the %s engine died (pids %s): restarting it, the retriever answers meanwhile", name, sorted(slot.pids)
        )
        await self._shut_down(dead)  # the old engine goes before the new one starts
        while slot.failures < self.policy.max_failures:
            slot.next_at = loop.time() + self.policy.delay(slot.failures)
            if await self._stopped_within(self.policy.delay(slot.failures)):
                return
            slot.next_at = None
            try:
                engine = await self._start(slot)
            except Exception as e:
                slot.failures += 1
                slot.error = f"{type(e).__name__}: {e}"[:300]
                log.warning("restart attempt %d of the %s engine failed: %s", slot.attempt, name, slot.error)
                slot.attempt += 1
                continue
            if self._closing:  # never swapped in during shutdown
                await self._shut_down(engine)
                return
            self._llm.replace_engine(dead, engine)
            slot.engine = engine
            slot.restarts += 1
            for job in slot.jobs:
                self.metrics.engine_restarts.labels(job=job).inc()
            self._set_state(slot, "alive")
            log.warning("the %s engine is back (restart %d, pids %s)", name, slot.restarts, sorted(slot.pids))
            return
        self._set_state(slot, "failed")
        log.error("giving up on the %s engine: %s", name, slot.describe(loop.time()))

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True (at once) when the service closes meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            return self._closing
        return True

    def _set_state(self, slot: SupervisedEngine, state: State) -> None:
        slot.state = state
        for job in slot.jobs:
            for name in STATES:
                self.metrics.engine_state.labels(job=job, state=name).set(1.0 if name == state else 0.0)

    # ---- what the probes and the preferences see --------------------------------------------------

    @property
    def failed(self) -> bool:
        """An engine's restarts gave up: the process cannot recover on its own (``/livez`` fails)."""
        return any(slot.state == "failed" for slot in self.engines)

    def detail(self) -> str:
        """Each engine's state, as ``/readyz`` reports it."""
        now = asyncio.get_running_loop().time()
        if len(self.engines) == 1:
            return self.engines[0].describe(now)
        return "; ".join(f"{'+'.join(slot.jobs)}: {slot.describe(now)}" for slot in self.engines)

    async def wait_alive(self, job: str) -> bool:
        """Wait until ``job``'s engine is alive: True, or False when its restarts gave up or the service closes."""
        slot = next(s for s in self.engines if job in s.jobs)
        while True:
            if self._closing or slot.state == "failed":
                return False
            if slot.state == "alive" and slot.engine is not None and engine_alive(slot.engine):
                return True
            await asyncio.sleep(CHECK_INTERVAL_S)

    # ---- shutdown ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop watching and restarting, then shut every engine down (also those of a start that failed)."""
        self._closing = True
        self._stop.set()
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        await asyncio.gather(*self._heals, return_exceptions=True)  # a build under way ends, shut down
        if self._building is not None:  # a start cancelled mid-build: wait for its engine, to shut it down
            await asyncio.gather(self._building, return_exceptions=True)
        for slot in reversed(self.engines):
            if slot.engine is not None:
                await self._shut_down(slot.engine)
        self._starter.shutdown(wait=False)


def _shut_down_when_built(building: asyncio.Future[AsyncLLM]) -> None:
    if not building.cancelled() and building.exception() is None:
        building.result().shutdown()
