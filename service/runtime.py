"""The composition root: a run directory, Redis, the vLLM engines and the re-rank pipeline, opened and closed.

One typed module without FastAPI, used by the app's lifespan (``service.main``), the batch jobs
(``dpo4rec.batch``) and the service benchmark (``benchmarks.service_bench``), so all three run the same
objects with the same engine configuration. ``open_service`` loads the run (refusing a partial or
mismatched one), starts the embedded Redis when no URL is set, starts the engines, and ALWAYS shuts them
down, in reverse order.

Engines and weights (``served_jobs``): a job ("preference", "rerank") runs on the base model plus its
adapter from ``llm.json``. With ``llm_adapters = "merged"`` (the default) each adapter is merged into a
cached full model (``llm.weights.merged_model``) and each distinct set of weights gets its own engine:
vLLM's CPU LoRA path is about 10x slower at prefill (docs/BENCHMARKS.md). With ``"lora"`` one engine
serves both jobs through vLLM multi-LoRA (less memory; the faster choice on a GPU). A job the run does
not use is not started: at fusion weight 0 the re-rank job never calls an engine. The engines are owned by
``service.supervisor``, which restarts one that dies (with back-off) and shuts them all down on close.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from llm.engine import EngineConfig, resolve_dtype, resolve_step_tokens
from llm.models import resolve_model
from llm.prompts import history_text
from llm.scoring import ScoringSpec
from llm.weights import merged_model
from retrieval.encoder import TextEncoder
from rundir.manifest import RunDirError
from rundir.reader import Artifacts, LLMSpec, load_artifacts
from service.admission import Admission
from service.cache import CacheUnavailable, Preference, PreferenceCache
from service.language_model import LanguageModel, LLMJobConfig
from service.preferences import PreferenceService
from service.processes import lower_priority
from service.redis_server import EmbeddedRedis
from service.rerank_pipeline import RerankPipeline
from service.settings import Settings
from service.supervisor import EngineSupervisor, RestartPolicy, SupervisedEngine
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    """Everything ``open_service`` built; on ``app.state.service`` while the app is up."""

    artifacts: Artifacts
    cache: PreferenceCache
    redis_server: EmbeddedRedis | None  # None with an external redis_url
    llm: LanguageModel | None  # None with llm_enabled=False
    supervisor: EngineSupervisor | None  # restarts a dead engine; None with llm_enabled=False
    preferences: PreferenceService
    pipeline: RerankPipeline


@dataclass(frozen=True)
class JobWeights:
    """What one LLM job runs on: a model folder, and a LoRA folder when adapters are served as LoRA."""

    model: Path
    lora: Path | None = None


def served_scoring(settings: Settings, spec: LLMSpec) -> ScoringSpec:
    """The run's scoring (``llm.json``), with the fusion weight overridden when the settings say so."""
    if settings.fusion_weight is None:
        return spec.scoring
    return replace(spec.scoring, weight=settings.fusion_weight, slice_weights=None)  # one weight for every slice


def served_jobs(settings: Settings, spec: LLMSpec, model_dir: Path) -> dict[str, JobWeights]:
    """The jobs the service runs and their weights; re-rank only when the scoring calls the LLM."""
    jobs = ["preference"] + (["rerank"] if served_scoring(settings, spec).uses_llm else [])
    out: dict[str, JobWeights] = {}
    for job in jobs:
        adapter = spec.adapters.get(job)
        if adapter is None:
            out[job] = JobWeights(model_dir)
        elif settings.llm_adapters == "lora":
            out[job] = JobWeights(model_dir, adapter)
        else:  # merged once per adapter content, reused by every later start
            out[job] = JobWeights(merged_model(model_dir, adapter, settings.model_cache))
    return out


def engine_config(settings: Settings, spec: LLMSpec, model: Path, lora: bool) -> EngineConfig:
    """The ``EngineConfig`` of one service engine (the benchmark's bare engine uses this too)."""
    return EngineConfig(
        model=str(model),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=resolve_step_tokens(settings.max_num_batched_tokens),
        max_logprobs=max(64, settings.rerank_k or spec.rerank_k),
        enable_lora=lora,
        kv_cache_gib=settings.kv_cache_gib,
        dtype=resolve_dtype(settings.llm_dtype),
        block_size=settings.llm_block_size,
        omp_wait_policy=settings.engine_omp_wait,
        ipc_busy_loop_s=settings.engine_ipc_busy_loop_s,
    )


def model_folder(settings: Settings, spec: LLMSpec) -> Path:
    """The base model's folder: the settings' override, else ``llm.json``'s model (resolved offline)."""
    return resolve_model(str(settings.llm_model) if settings.llm_model else spec.base_model, settings.model_cache)


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


def supervised_engines(settings: Settings, spec: LLMSpec, jobs: dict[str, JobWeights]) -> list[SupervisedEngine]:
    """One engine per distinct model folder, with the jobs it serves; one that only generates preferences in
    the background runs niced (``preference_engine_nice``)."""
    engines = []
    for folder in dict.fromkeys(w.model for w in jobs.values()):
        served = tuple(job for job, w in jobs.items() if w.model == folder)
        lora = any(jobs[job].lora is not None for job in served)
        nice = settings.preference_engine_nice if "rerank" not in served else 0
        engines.append(SupervisedEngine(engine_config(settings, spec, folder, lora), served, nice=nice))
    return engines


def restart_policy(settings: Settings) -> RestartPolicy:
    return RestartPolicy(
        backoff_s=settings.engine_restart_backoff_s,
        backoff_max_s=settings.engine_restart_backoff_max_s,
        max_failures=settings.engine_restart_max_failures,
    )


async def _start_llm(
    settings: Settings, spec: LLMSpec, metrics: ServiceMetrics, stack: AsyncExitStack
) -> tuple[LanguageModel, EngineSupervisor]:
    from transformers import AutoTokenizer

    model_dir = await asyncio.to_thread(model_folder, settings, spec)
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
    jobs = await asyncio.to_thread(served_jobs, settings, spec, model_dir)
    supervisor = EngineSupervisor(supervised_engines(settings, spec, jobs), restart_policy(settings), metrics)
    stack.push_async_callback(supervisor.close)  # shuts down whatever started, even if a later start fails
    engines = await supervisor.start()  # warmed up
    generation = spec.preference_generation
    if settings.preference_max_tokens is not None:
        generation = replace(generation, max_tokens=settings.preference_max_tokens)
    cfg = LLMJobConfig(
        prompt=spec.prompt,
        generation=generation,
        rerank_k=settings.rerank_k or spec.rerank_k,
        loras={job: w.lora for job, w in jobs.items()},
    )
    queue_s = None if settings.admission_queue_ms is None else settings.admission_queue_ms / 1000
    admission = Admission(rate=200.0, slots=settings.engine_slots, queue_s=queue_s)
    llm = LanguageModel(engines, tokenizer, cfg, metrics, admission)
    log.info(
        "llm jobs: %s",
        ", ".join(f"{job} on {w.model.name}{' + LoRA ' + w.lora.name if w.lora else ''}" for job, w in jobs.items()),
    )
    if settings.admission:  # the engine's prompt tokens/s on this machine, before the first request
        rate = await llm.measure_rate()
        log.info("engine rate measured: %.0f prompt tokens/s (admission by predicted completion on)", rate)
    llm.admission.headroom = settings.admission_headroom
    metrics.watch_engine(llm.unfinished_requests, [engine.counters for engine in supervisor.engines])
    stack.callback(metrics.watch_engine, lambda: 0.0)  # drop the gauge's reference to the engines
    supervisor.watch(llm)  # from now on a dead engine is restarted and swapped into llm
    return llm, supervisor


async def _start_cache(
    settings: Settings, version: str, stack: AsyncExitStack
) -> tuple[PreferenceCache, EmbeddedRedis | None]:
    server = None
    url = settings.redis_url
    if url is None:
        server = EmbeddedRedis()
        await server.start()
        stack.push_async_callback(server.close)
        url = server.url
    cache = PreferenceCache(
        url, version, settings.preference_ttl_s, settings.redis_timeout_s, settings.redis_retry_after_s
    )
    stack.push_async_callback(cache.close)
    if not await cache.ping():
        log.warning("redis at %s is unreachable at start: serving without a cache until it answers", url.split("@")[-1])
    return cache, server


@asynccontextmanager
async def open_service(settings: Settings, metrics: ServiceMetrics) -> AsyncIterator[ServiceState]:
    """Everything ``/rerank`` needs (run, Redis, engines, preferences, pipeline), closed in reverse order."""
    async with AsyncExitStack() as stack:
        if settings.torch_threads is not None:  # leave the cores to the engine process; restored on close
            import torch

            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(settings.torch_threads)
        try:
            artifacts = await asyncio.to_thread(load_artifacts, settings.run_dir, settings.verify_checksums)
        except RunDirError as e:
            log.error("refusing to start: %s", e)
            raise
        encoder = await asyncio.to_thread(TextEncoder, artifacts.encoder_config)
        if encoder.dim != artifacts.preference_vectors.shape[1]:
            raise RunDirError(
                f"the text encoder is {encoder.dim}-d but the run's preference vectors are "
                f"{artifacts.preference_vectors.shape[1]}-d: encoder.json does not match the run"
            )
        cache, server = await _start_cache(settings, artifacts.version, stack)
        if settings.warm_cache:
            await _warm_cache(cache, artifacts)
        llm, supervisor = (
            await _start_llm(settings, artifacts.llm, metrics, stack) if settings.llm_enabled else (None, None)
        )
        if supervisor is not None and settings.api_nice:  # not the thread that starts engines (service.processes)
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
        )
        stack.push_async_callback(preferences.close)
        log.info(
            "ready: run %s, version %s, redis %s, llm %s",
            artifacts.root,
            artifacts.version,
            "embedded" if server else "external",
            "on" if llm else "off",
        )
        scoring = served_scoring(settings, artifacts.llm)
        pipeline = RerankPipeline(artifacts, settings, preferences, llm, metrics, scoring)
        yield ServiceState(
            artifacts=artifacts,
            cache=cache,
            redis_server=server,
            llm=llm,
            supervisor=supervisor,
            preferences=preferences,
            pipeline=pipeline,
        )
