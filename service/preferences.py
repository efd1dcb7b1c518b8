"""Where a request's preference comes from: Redis -> the run directory -> a stand-in while the LLM writes one.

Lookup order (SPEC section 7): the Redis cache; for a user of the run, the precomputed text and vector
(written back to Redis); otherwise the request is answered **at once** with a stand-in that needs no
generation: the user's history lines as the text (the no-LLM control of docs/RESULTS.md, as good as
SmolLM2's texts for the retriever), encoded by the frozen text encoder, flagged ``preference_pending``.
The LLM's text is generated in the background, encoded, and stored with a TTL; the next request uses
it. A miss never waits for a generation.

Background generations are bounded (``preference_queue`` pending at once, ``dpo4rec_preference_queue``
in /metrics): when the queue is full the generation is dropped, not the request (outcome ``dropped``).
Of the queue, ``preference_workers`` generate at once (default 1): background texts take what the
re-rank engine leaves of the shared cores, not the capacity on-time answers need.

Generation is single-flight, at two levels:

- in-process: one shared task per user; concurrent requests for the same new user await that one
  task (``asyncio.shield``, each with its own deadline), so N requests cause ONE generation;
- across replicas: the task first takes ``lock:pref:{version}:{user}`` with ``SET NX PX``; if another
  replica holds it, the task polls the cache for that replica's result instead of generating. With
  Redis down, the in-process single-flight alone applies.

The task is detached from the requests (bounded by ``preference_timeout_s``). It starts once the request
that caused it has been answered (``Resolved.release``, called by the pipeline after its LLM stage; at
most ``start_delay_s`` later in any case), so a new user's first answer does not share the cores with
its own preference's generation. Shutdown cancels open generations, which aborts them in vLLM.

None is lost silently when the engine dies (``service.supervisor`` restarts it): a generation waits for the
engine to be back before it takes its turn, and one whose engine died under it is tried once more, once the
engine is back; otherwise it is dropped and counted (``dpo4rec_preference_generations_dropped_total{reason}``:
``engine_dead`` when the engine died under it twice, ``engine_failed`` when the restarts gave up, and
``queue_full`` for the bounded queue above).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from llm.prompts import HistoryItem
from retrieval.encoder import TextEncoder
from service.cache import CacheUnavailable, Preference, PreferenceCache
from service.language_model import EngineUnavailable, LanguageModel, LLMError
from service.supervisor import EngineSupervisor
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)

Source = Literal["cache", "run", "history", "generated", "none"]
LOCK_POLL_S = 0.05  # how often a replica waiting on another's generation looks at the cache


@dataclass
class Resolved:
    preference: Preference | None
    source: Source
    degraded: set[str]
    release: Callable[[], None] = lambda: None  # lets a background generation this request caused start


def _noop() -> None:
    pass


@dataclass(frozen=True)
class _Generated:
    preference: Preference
    source: str  # "generated", or "cache" when another replica generated it
    cache_failed: bool


class PreferenceService:
    def __init__(
        self,
        *,
        version: str,
        run_preferences: dict[str, tuple[str, np.ndarray]],
        cache: PreferenceCache | None,
        llm: LanguageModel | None,
        encoder: TextEncoder,
        metrics: ServiceMetrics,
        generation_timeout_s: float,
        stand_in: Callable[[list[HistoryItem]], str],
        queue_size: int = 64,
        workers: int = 1,
        wait: bool = False,
        start_delay_s: float = 10.0,
        supervisor: EngineSupervisor | None = None,
        stand_in_vector: bool = True,
    ):
        self.version = version
        self.run_preferences = run_preferences
        self.cache = cache
        self.llm = llm
        self.supervisor = supervisor  # restarts a dead engine; generations wait for it (None: nothing to wait for)
        self.encoder = encoder
        self.metrics = metrics
        self.generation_timeout_s = generation_timeout_s
        self.stand_in = stand_in  # history -> text (llm.prompts.history_text with the run's prompt settings)
        self.queue_size = queue_size
        # generations in the engine at once; the rest of the queue waits. The cores are shared with the
        # re-rank engine, and a background text must not take the capacity that on-time answers need: with
        # every queued generation in the engine at once, a load test with new users shed 99 % of re-ranks.
        self._workers = asyncio.Semaphore(workers)
        self.wait = wait  # batch jobs: a miss waits for the LLM's text (latency does not matter there)
        self.start_delay_s = start_delay_s  # a generation waits for its request's answer, at most this long
        # encode a miss's stand-in text: only a retriever that fuses preference vectors reads it (for plain SASRec
        # the encode was ~50 ms of a miss's answer under load, docs/BENCHMARKS.md)
        self.stand_in_vector = stand_in_vector
        self._tasks: dict[str, asyncio.Task[_Generated]] = {}
        metrics.preference_queue.set_function(lambda: len(self._tasks))

    async def resolve(self, user_id: str, history: list[HistoryItem], request_id: str) -> Resolved:
        """The user's preference, without waiting for any generation."""
        degraded: set[str] = set()
        if self.cache is not None:
            try:
                hit = await self.cache.get(user_id)
            except CacheUnavailable:
                self.metrics.cache.labels(result="error").inc()
                degraded.add("cache_unavailable")
            else:
                self.metrics.cache.labels(result="hit" if hit else "miss").inc()
                if hit is not None:
                    return Resolved(hit, "cache", degraded)
        stored = self.run_preferences.get(user_id)
        if stored is not None:
            preference = Preference(text=stored[0], vector=stored[1])
            if self.cache is not None and "cache_unavailable" not in degraded:
                try:
                    await self.cache.set(user_id, preference)  # re-warm after a Redis restart or TTL
                except CacheUnavailable:
                    degraded.add("cache_unavailable")
            return Resolved(preference, "run", degraded)
        if not history:
            return Resolved(None, "none", degraded)
        gate = None if self.wait else asyncio.Event()
        release = gate.set if gate is not None else _noop
        if self.llm is not None and self._schedule(user_id, history, request_id, gate):
            task = self._tasks.get(user_id)
            if self.wait and task is not None:
                try:
                    done = await asyncio.shield(task)
                except Exception as e:  # generation or encoding failed: the stand-in answers
                    log.warning("preference for %s unavailable: %s", user_id, e)
                    degraded.add("preference_unavailable")
                else:
                    if done.cache_failed:
                        degraded.add("cache_unavailable")
                    return Resolved(done.preference, "generated" if done.source == "generated" else "cache", degraded)
            else:
                degraded.add("preference_pending")
        text = self.stand_in(history)
        if self.stand_in_vector:
            vector = (await asyncio.to_thread(self.encoder.encode, [text]))[0]  # (D,) float32
        else:
            vector = np.zeros(0, np.float32)  # read by nothing: the served retriever takes no preference vector
        return Resolved(Preference(text=text, vector=vector), "history", degraded, release)

    def _schedule(self, user_id: str, history: list[HistoryItem], request_id: str, gate: asyncio.Event | None) -> bool:
        """Start (or join) the user's background generation; False when the queue is full (dropped). With a
        ``gate``, the generation starts when it is set (the request answered) or after ``start_delay_s``."""
        if user_id in self._tasks:
            return True
        if len(self._tasks) >= self.queue_size:
            self._dropped("queue_full")
            return False
        coro = self._generate(user_id, history, request_id, gate)
        task = asyncio.create_task(coro, name=f"preference:{user_id}")
        self._tasks[user_id] = task
        task.add_done_callback(functools.partial(self._forget, user_id))
        return True

    def _forget(self, user_id: str, task: asyncio.Task[_Generated]) -> None:
        if self._tasks.get(user_id) is task:
            del self._tasks[user_id]
        if not task.cancelled() and task.exception() is not None:
            log.warning("background preference for %s failed: %s", user_id, task.exception())

    async def _generate(
        self, user_id: str, history: list[HistoryItem], request_id: str, gate: asyncio.Event | None
    ) -> _Generated:
        if gate is not None:
            try:
                await asyncio.wait_for(gate.wait(), self.start_delay_s)
            except asyncio.TimeoutError:
                pass  # the request is still running (or failed before releasing): start anyway
        try:
            return await self._attempt(user_id, history, request_id, last=False)
        except EngineUnavailable as e:
            log.warning("preference for %s: %s; tried again once the engine is back", user_id, e)
        return await self._attempt(user_id, history, request_id, last=True)

    async def _attempt(self, user_id: str, history: list[HistoryItem], request_id: str, last: bool) -> _Generated:
        """One try, once the engine is alive; the ``last`` one drops the generation (counted) if the engine dies."""
        if self.supervisor is not None and not await self.supervisor.wait_alive("preference"):
            self._dropped("engine_failed")
            raise LLMError("preference: the engine's restarts gave up")  # not EngineUnavailable: no retry
        async with self._workers:  # its turn in the queue; the timeout bounds the generation itself
            try:
                return await asyncio.wait_for(
                    self._generate_locked(user_id, history, request_id), self.generation_timeout_s
                )
            except asyncio.TimeoutError:
                self.metrics.generations.labels(outcome="timeout").inc()
                raise
            except EngineUnavailable:
                if last:
                    self._dropped("engine_dead")
                raise

    def _dropped(self, reason: str) -> None:
        self.metrics.generations.labels(outcome="dropped").inc()
        self.metrics.generations_dropped.labels(reason=reason).inc()

    async def _generate_locked(self, user_id: str, history: list[HistoryItem], request_id: str) -> _Generated:
        token = uuid.uuid4().hex
        owned, cache_failed = False, False
        loop = asyncio.get_running_loop()
        lock_ms = int(self.generation_timeout_s * 1000)
        while self.cache is not None and not cache_failed:
            try:
                owned = await self.cache.acquire_lock(user_id, token, lock_ms)
                if owned:
                    break
                # another replica is generating: wait for its result, or for its lock to lapse
                started = loop.time()
                while loop.time() - started < self.generation_timeout_s:
                    await asyncio.sleep(LOCK_POLL_S)
                    found = await self.cache.get(user_id)
                    if found is not None:
                        return _Generated(found, "cache", False)
                    if not await self.cache.lock_held(user_id):
                        break
            except CacheUnavailable:
                cache_failed = True  # in-process single-flight only
        try:
            preference = await self._generate_one(user_id, history, request_id)
            if self.cache is not None and not cache_failed:
                try:
                    await self.cache.set(user_id, preference)
                except CacheUnavailable:
                    cache_failed = True
            return _Generated(preference, "generated", cache_failed)
        finally:
            if owned and self.cache is not None:
                await self.cache.release_lock(user_id, token)

    async def _generate_one(self, user_id: str, history: list[HistoryItem], request_id: str) -> Preference:
        assert self.llm is not None
        try:
            text = await self.llm.preference(history, request_id)
            vector = (await asyncio.to_thread(self.encoder.encode, [text]))[0]  # (D,) float32
        except (asyncio.CancelledError, EngineUnavailable):  # the engine died: tried again or dropped, counted there
            raise
        except Exception:
            self.metrics.generations.labels(outcome="error").inc()
            raise
        self.metrics.generations.labels(outcome="ok").inc()
        log.info("generated a preference", extra={"user_id": user_id, "chars": len(text)})
        return Preference(text=text, vector=vector)

    async def close(self) -> None:
        """Cancel open generations (each aborts its vLLM request) and wait for them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
