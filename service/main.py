"""``create_app()``: the FastAPI app, and the lifespan that owns the run, Redis and the vLLM engine.

After full-stack-fastapi-template's thin ``main.py`` and vLLM's ``build_async_engine_client``: the
lifespan loads the run directory (refusing a partial or mismatched one), starts the embedded Redis
when no URL is set, starts the in-process ``AsyncLLM``, and ALWAYS shuts them down, in reverse order,
after draining in-flight requests. Middlewares, outermost first: request id + access log + request
metrics, API key, in-flight cap, body size.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import Depends, FastAPI

from llm.engine import EngineConfig, EngineCounters, async_engine
from llm.models import resolve_model
from llm.prompts import history_text
from retrieval.encoder import TextEncoder
from retrieval.rundir import RunDirError
from service.artifacts import Artifacts, load_artifacts
from service.auth import ApiKeyMiddleware, bearer_scheme
from service.cache import CacheUnavailable, Preference, PreferenceCache
from service.deps import ServiceState
from service.errors import install_error_handlers
from service.language_model import LanguageModel, LLMJobConfig, resolve_dtype
from service.limits import BodySizeLimitMiddleware, InFlightLimiter, InFlightLimitMiddleware
from service.logging import RequestContextMiddleware
from service.metrics import ServiceMetrics
from service.pipeline import RerankPipeline
from service.preferences import PreferenceService
from service.redis_server import EmbeddedRedis
from service.routes import health, metrics, rerank
from service.settings import Settings

log = logging.getLogger(__name__)
WORK_PATHS = ("/rerank", "/v1/rerank")


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
    settings: Settings, artifacts: Artifacts, metrics: ServiceMetrics, stack: AsyncExitStack
) -> LanguageModel:
    from transformers import AutoTokenizer

    spec = artifacts.llm
    name = str(settings.llm_model) if settings.llm_model else spec.base_model
    model_dir = await asyncio.to_thread(resolve_model, name, settings.model_cache)
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
    rerank_k = settings.rerank_k or spec.rerank_k
    engine_cfg = EngineConfig(
        model=str(model_dir),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_logprobs=max(64, rerank_k),
        enable_lora=any(spec.adapters.values()),
        kv_cache_gib=settings.kv_cache_gib,
        dtype=resolve_dtype(settings.llm_dtype),
    )
    counters = EngineCounters()  # prefix-cache hits and token counts, in /metrics
    engine = await stack.enter_async_context(async_engine(engine_cfg, counters=counters))  # warmed up first
    generation = spec.preference_generation
    if settings.preference_max_tokens is not None:
        generation = replace(generation, max_tokens=settings.preference_max_tokens)
    llm = LanguageModel(
        engine,
        tokenizer,
        LLMJobConfig(prompt=spec.prompt, generation=generation, rerank_k=rerank_k, adapters=spec.adapters),
        metrics,
    )
    if settings.admission:  # the engine's prompt tokens/s on this machine, before the first request
        rate = await llm.measure_rate()
        log.info("engine rate measured: %.0f prompt tokens/s (admission by predicted completion on)", rate)
    llm.admission.headroom = settings.admission_headroom
    metrics.watch_engine(llm.unfinished_requests, counters)
    stack.callback(metrics.watch_engine, lambda: 0.0)  # drop the gauge's reference to the engine
    return llm


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
    """Everything ``/rerank`` needs (run, Redis, engine, preferences, pipeline), closed in reverse order.

    Shared by the app's lifespan and the batch jobs (``dpo4rec.batch``), so both run one pipeline.
    """
    async with AsyncExitStack() as stack:
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
        llm = await _start_llm(settings, artifacts, metrics, stack) if settings.llm_enabled else None
        preferences = PreferenceService(
            version=artifacts.version,
            run_preferences={
                u: (artifacts.preference_texts[u], artifacts.preference_vectors[r])
                for u, r in artifacts.preference_rows.items()
            },
            cache=cache,
            llm=llm,
            encoder=encoder,
            metrics=metrics,
            generation_timeout_s=settings.preference_timeout_s,
            stand_in=functools.partial(history_text, config=artifacts.llm.prompt),
            queue_size=settings.preference_queue,
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
        yield ServiceState(
            artifacts=artifacts,
            cache=cache,
            redis_server=server,
            engine=llm.engine if llm else None,
            llm=llm,
            preferences=preferences,
            pipeline=RerankPipeline(artifacts, settings, preferences, llm, metrics),
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with open_service(settings, app.state.metrics) as state:
        app.state.service = state
        try:
            yield
        finally:
            drained = await app.state.limiter.drain(settings.drain_timeout_s)
            log.info("shutting down (in-flight drained: %s)", drained)
            app.state.service = None


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """The app for ``settings`` (default: from ``DPO4REC_*`` variables; ``overrides`` win)."""
    if settings is None:
        settings = Settings(**overrides)
    elif overrides:
        settings = Settings.model_validate({**settings.model_dump(), **overrides})
    app = FastAPI(
        title="DPO4Rec re-ranking service",
        version="0.1.0",
        summary="LLM re-ranking for recommendations, aligned with recommender feedback by DPO",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics_ = ServiceMetrics()
    app.state.limiter = limiter = InFlightLimiter(settings.max_in_flight, settings.retry_after_s, metrics_)
    app.state.service = None
    install_error_handlers(app)
    secured = [Depends(bearer_scheme)] if settings.api_keys else []
    app.include_router(rerank.router, dependencies=secured)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # add_middleware wraps: the last added is the outermost
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics_)
    app.add_middleware(InFlightLimitMiddleware, limiter=limiter, paths=WORK_PATHS)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, paths=WORK_PATHS, metrics=metrics_)
    app.add_middleware(RequestContextMiddleware, metrics=metrics_)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.main:app_factory`` (settings from the environment)."""
    return create_app()
