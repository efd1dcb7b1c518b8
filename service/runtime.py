"""The composition root: a run directory, Redis, the vLLM engines and the re-rank pipeline, opened and closed.

One typed module without FastAPI, used by the app's lifespan (``service.main``), the batch jobs
(``dpo4rec.batch``) and the service benchmark (``benchmarks.service_bench``), so all three run the same
objects with the same engine configuration. ``open_service`` loads the run (refusing a partial or
mismatched one), starts the embedded Redis when no URL is set, starts the engines, and ALWAYS shuts them
down, in reverse order.

Which engines run which weights is ``service.engines`` (in process, or on the engine tier's servers with
``DPO4REC_ENGINE_URL``). A job the run does not use is not started: at fusion weight 0 the re-rank job never
calls an engine. The engines are owned by ``service.supervisor``, which restarts an in-process one that dies
(with back-off) and shuts them all down on close; ``EnginePool`` shares them between the versions served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm.prompts import history_text
from retrieval.encoder import TextEncoder
from rundir.manifest import RunDirError
from rundir.reader import Artifacts, LLMSpec, load_artifacts
from service.admission import Admission
from service.cache import CacheUnavailable, Preference, PreferenceCache
from service.engines import (
    JobWeights,
    adapter_files,
    base_model,
    llm_jobs,
    model_folder,
    remote_targets,
    rerank_k,
    restart_policy,
    served_jobs,
    served_scoring,
    supervised_engines,
)
from service.language_model import LanguageModel, LLMJobConfig
from service.preferences import PreferenceService
from service.processes import lower_priority
from service.redis_server import EmbeddedRedis
from service.rerank_pipeline import RerankPipeline
from service.settings import Settings
from service.supervisor import EngineSupervisor, SupervisedEngine
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    """One served run version: what ``open_version`` built; on ``app.state.service`` while it is served."""

    artifacts: Artifacts
    cache: PreferenceCache
    redis_server: EmbeddedRedis | None  # None with an external redis_url
    llm: LanguageModel | None  # None with llm_enabled=False
    supervisor: EngineSupervisor | None  # restarts a dead engine; None with llm_enabled=False
    preferences: PreferenceService
    pipeline: RerankPipeline
    shared: Shared | None = None  # what every version shares (Redis, encoder, engines)
    in_flight: int = 0  # /rerank requests running on this version (a replaced one is closed at 0)
    closer: AsyncExitStack | None = None  # closes what this version owns (set for the first version)


@dataclass
class _Lease:
    llm: LanguageModel
    supervisor: EngineSupervisor
    stack: AsyncExitStack
    users: int = 0


class EnginePool:
    """The LLM engines by the weights and job settings they serve: a version whose LLM is the served one's shares
    its engines (a catalog change, new slice weights); one with other weights starts its own, and the last
    version to let go of a set shuts it down."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings, self.metrics = settings, metrics
        self._leases: dict[tuple[object, ...], _Lease] = {}
        self._lock = asyncio.Lock()
        self.started = 0  # engine sets started so far (the first one lowers the API's priority)

    def key(self, artifacts: Artifacts) -> tuple[object, ...]:
        """What decides the engines: the base model, the adapters' content (their manifest checksums: a version
        copies its adapters, so paths differ where the weights do not), the jobs served, the job settings."""
        spec = artifacts.llm
        model = base_model(self.settings, spec)
        adapters = tuple(
            (job, adapter_files(spec, artifacts.manifest, job) or str(a))
            for job, a in sorted(spec.adapters.items())
            if a is not None
        )
        rerank = served_scoring(self.settings, spec).uses_llm
        return (model, adapters, rerank, spec.prompt, spec.preference_generation, rerank_k(self.settings, spec))

    async def acquire(self, artifacts: Artifacts) -> tuple[LanguageModel, EngineSupervisor, tuple[object, ...]]:
        key = self.key(artifacts)
        spec = artifacts.llm
        async with self._lock:
            lease = self._leases.get(key)
            if lease is None:
                stack = AsyncExitStack()
                try:
                    llm, supervisor = await _start_llm(self.settings, spec, artifacts.manifest, self.metrics, stack)
                except BaseException:
                    await stack.aclose()
                    raise
                lease = self._leases[key] = _Lease(llm, supervisor, stack)
                self.started += 1
            lease.users += 1
            return lease.llm, lease.supervisor, key

    async def release(self, key: tuple[object, ...]) -> None:
        async with self._lock:
            lease = self._leases.get(key)
            if lease is None:
                return
            lease.users -= 1
            if lease.users <= 0:
                del self._leases[key]
                await lease.stack.aclose()
                if self._leases:  # the engine gauges read the newest engines still serving
                    newest = list(self._leases.values())[-1]
                    engines = [engine.counters for engine in newest.supervisor.engines]
                    self.metrics.watch_engine(newest.llm.unfinished_requests, engines)

    async def close(self) -> None:
        for key in list(self._leases):
            lease = self._leases.pop(key)
            await lease.stack.aclose()


@dataclass
class Shared:
    """What the versions a service serves share: Redis (embedded or external), text encoders, the engines."""

    redis_url: str
    redis_server: EmbeddedRedis | None
    engines: EnginePool
    encoders: dict[str, TextEncoder]

    async def encoder(self, artifacts: Artifacts) -> TextEncoder:
        key = repr(artifacts.encoder_config)
        if key not in self.encoders:
            self.encoders[key] = await asyncio.to_thread(TextEncoder, artifacts.encoder_config)
        return self.encoders[key]


async def _warm_cache(cache: PreferenceCache, artifacts: Artifacts) -> None:
    """Put the run's precomputed preferences into Redis (a Redis outage only logs a warning)."""
    items = (
        (user, Preference(text, artifacts.preference_vectors[row]))
        for user, row in artifacts.preference_rows.items()
        for text in (artifacts.preference_texts[user],)
    )
    try:
        written = await cache.set_many(items)
    except CacheUnavailable as e:
        log.warning("cache warm-up skipped: %s", e)
        return
    log.info("cache warmed with %d preferences", written)


async def _start_llm(
    settings: Settings, spec: LLMSpec, manifest: dict[str, Any], metrics: ServiceMetrics, stack: AsyncExitStack
) -> tuple[LanguageModel, EngineSupervisor]:
    from transformers import AutoTokenizer

    model_dir = await asyncio.to_thread(model_folder, settings, spec)  # the tokenizer's, also with remote engines
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
    served, servers = remote_targets(settings, spec, manifest, llm_jobs(settings, spec))
    if servers:  # the engine tier serves the weights: nothing to merge or start here
        jobs = {job: JobWeights(model_dir) for job in served}
        slots = [SupervisedEngine(target, sent) for target, sent in servers]
    else:
        jobs = await asyncio.to_thread(served_jobs, settings, spec, model_dir)
        slots = supervised_engines(settings, spec, jobs)
    supervisor = EngineSupervisor(slots, restart_policy(settings), metrics)
    stack.push_async_callback(supervisor.close)  # shuts down whatever started, even if a later start fails
    engines = await supervisor.start()  # warmed up
    generation = spec.preference_generation
    if settings.preference_max_tokens is not None:
        generation = replace(generation, max_tokens=settings.preference_max_tokens)
    cfg = LLMJobConfig(
        prompt=spec.prompt,
        generation=generation,
        rerank_k=rerank_k(settings, spec),
        loras={job: w.lora for job, w in jobs.items()},
        served=served,
    )
    queue_s = None if settings.admission_queue_ms is None else settings.admission_queue_ms / 1000
    admission = Admission(rate=200.0, slots=settings.engine_slots, queue_s=queue_s)
    llm = LanguageModel(engines, tokenizer, cfg, metrics, admission)
    log.info(
        "llm jobs: %s",
        ", ".join(
            f"{job} on {settings.engine_urls()[job]} ({served[job]})"
            if job in served
            else f"{job} on {w.model.name}{' + LoRA ' + w.lora.name if w.lora else ''}"
            for job, w in jobs.items()
        ),
    )
    if settings.admission:  # the engine's prompt tokens/s on this machine, before the first request
        rate = await llm.measure_rate()
        log.info("engine rate measured: %.0f prompt tokens/s (admission by predicted completion on)", rate)
    llm.admission.headroom = settings.admission_headroom
    metrics.watch_engine(llm.unfinished_requests, [engine.counters for engine in supervisor.engines])
    stack.callback(metrics.watch_engine, lambda: 0.0)  # drop the gauge's reference to the engines
    supervisor.watch(llm)  # from now on a dead engine is restarted and swapped into llm
    return llm, supervisor


async def _start_redis(settings: Settings, stack: AsyncExitStack) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL: the settings', or an embedded server's (closed with ``stack``)."""
    if settings.redis_url is not None:
        return settings.redis_url, None
    server = EmbeddedRedis()
    await server.start()
    stack.push_async_callback(server.close)
    return server.url, server


async def _open_cache(settings: Settings, url: str, version: str, stack: AsyncExitStack) -> PreferenceCache:
    cache = PreferenceCache(
        url,
        version,
        settings.preference_ttl_s,
        settings.redis_timeout_s,
        settings.redis_retry_after_s,
        local_ttl_s=settings.preference_local_ttl_s,
    )
    stack.push_async_callback(cache.close)
    if not await cache.ping():
        log.warning("redis at %s is unreachable at start: serving without a cache until it answers", url.split("@")[-1])
    return cache


@asynccontextmanager
async def open_service(settings: Settings, metrics: ServiceMetrics) -> AsyncIterator[ServiceState]:
    """Everything ``/rerank`` needs (Redis, engines, and the run version ``settings.run_dir`` names: a run
    directory or a run root's ``current``), closed in reverse order. Later versions open beside it with
    ``open_version`` (``service.rollout``) and share its Redis, encoder and, where the weights match, engines."""
    async with AsyncExitStack() as stack:
        if settings.torch_threads is not None:  # leave the cores to the engine process; restored on close
            import torch

            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(settings.torch_threads)
        url, server = await _start_redis(settings, stack)
        pool = EnginePool(settings, metrics)
        stack.push_async_callback(pool.close)
        shared = Shared(url, server, pool, {})
        first = AsyncExitStack()
        stack.push_async_callback(first.aclose)  # a no-op when a rollout already closed it
        state = await first.enter_async_context(open_version(settings, metrics, settings.run_dir, shared))
        state.closer = first
        yield state


@asynccontextmanager
async def open_version(
    settings: Settings, metrics: ServiceMetrics, run_dir: Path, base: Shared | ServiceState
) -> AsyncIterator[ServiceState]:
    """One run version (refusing a partial or mismatched one): its artifacts, cache keys, preference service
    and pipeline, on ``base``'s shared Redis and engines (new engines only for weights none serves yet)."""
    shared = base.shared if isinstance(base, ServiceState) else base
    assert shared is not None, "a state from open_version carries its shared parts"
    async with AsyncExitStack() as stack:
        try:
            artifacts = await asyncio.to_thread(load_artifacts, run_dir, settings.verify_checksums)
        except RunDirError as e:
            log.error("refusing to serve %s: %s", run_dir, e)
            raise
        encoder = await shared.encoder(artifacts)
        if encoder.dim != artifacts.preference_vectors.shape[1]:
            raise RunDirError(
                f"the text encoder is {encoder.dim}-d but the run's preference vectors are "
                f"{artifacts.preference_vectors.shape[1]}-d: encoder.json does not match the run"
            )
        cache = await _open_cache(settings, shared.redis_url, artifacts.version, stack)
        if settings.warm_cache:
            await _warm_cache(cache, artifacts)
        llm = supervisor = None
        if settings.llm_enabled:
            first_engines = shared.engines.started == 0
            llm, supervisor, key = await shared.engines.acquire(artifacts)
            stack.push_async_callback(shared.engines.release, key)
            # the API gives way only to a re-rank engine: at weight 0 the one engine writes background preferences
            # (itself at +preference_engine_nice), and a niced API then answered at half the rate (BENCHMARKS)
            reranks = served_scoring(settings, artifacts.llm).uses_llm
            # not for a remote engine, even on this machine: the API's own HTTP client feeds it, and a niced API
            # lost goodput to a busy server (docs/BENCHMARKS.md, "The engine as its own tier")
            in_process = not settings.engine_urls()
            if first_engines and settings.api_nice and reranks and in_process:  # not the engine starter thread
                lower_priority(settings.api_nice, keep={supervisor.starter_tid})
                log.info("API process niceness +%d (the engine processes keep theirs)", settings.api_nice)
        preferences = PreferenceService(
            version=artifacts.version,
            run_preferences={
                u: (artifacts.preference_texts[u], artifacts.preference_vectors[r])
                for u, r in artifacts.preference_rows.items()
            },
            cache=cache,
            llm=llm,
            supervisor=supervisor,
            encoder=encoder,
            metrics=metrics,
            generation_timeout_s=settings.preference_timeout_s,
            stand_in=functools.partial(history_text, config=artifacts.llm.prompt),
            queue_size=settings.preference_queue,
            workers=settings.preference_workers,
            wait=settings.preference_wait,
            stand_in_vector=artifacts.retriever.cfg.pref_dim > 0,
        )
        stack.push_async_callback(preferences.close)
        log.info(
            "ready: run %s, version %s, redis %s, llm %s",
            artifacts.root,
            artifacts.version,
            "embedded" if shared.redis_server else "external",
            "on" if llm else "off",
        )
        scoring = served_scoring(settings, artifacts.llm)
        pipeline = RerankPipeline(artifacts, settings, preferences, llm, metrics, scoring)
        yield ServiceState(
            artifacts=artifacts,
            cache=cache,
            redis_server=shared.redis_server,
            llm=llm,
            supervisor=supervisor,
            preferences=preferences,
            pipeline=pipeline,
            shared=shared,
        )
