"""``create_app()``: the FastAPI app, and the lifespan that owns the run, Redis and the vLLM engine.

After full-stack-fastapi-template's thin ``main.py`` and vLLM's ``build_async_engine_client``: the
lifespan opens the service's objects with ``service.runtime.open_service`` (the run directory, Redis,
the vLLM engines, the pipeline; shared with the batch jobs and the benchmark) and closes them after
draining in-flight requests. Middlewares, outermost first: request id + access log + request
metrics, API key, in-flight cap, body size.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from rundir.versions import is_root
from service.auth import ApiKeyMiddleware, bearer_scheme
from service.background import BackgroundTraining
from service.errors import install_error_handlers
from service.limits import BodySizeLimitMiddleware, InFlightLimiter, InFlightLimitMiddleware
from service.logging import RequestContextMiddleware
from service.rollout import Rollout, freeze_heap
from service.routes import admin, health, metrics, rerank
from service.runtime import open_service
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)
WORK_PATHS = ("/rerank", "/v1/rerank")
KEYED_PATHS = (*WORK_PATHS, "/admin/reload")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with open_service(settings, app.state.metrics) as state:
        app.state.service = state
        app.state.metrics.served_version.info({"version": state.artifacts.version})
        if settings.gc_freeze:
            freeze_heap()  # the start-up's objects, engines included, out of every later collection (service.rollout)
        app.state.rollout = rollout = Rollout(app, settings, app.state.metrics)
        rollout.start()  # watches a run root's current pointer (service.rollout)
        app.state.training = training = _background_training(settings)
        if training is not None:
            training.start(rollout.reload)
        try:
            yield
        finally:
            drained = await app.state.limiter.drain(settings.drain_timeout_s)
            log.info("shutting down (in-flight drained: %s)", drained)
            if training is not None:
                await training.close()
            await rollout.close()
            app.state.rollout = None
            app.state.service = None


def _background_training(settings: Settings) -> BackgroundTraining | None:
    """The next version's training, when asked for, served from a run root, and not trained there yet."""
    config = settings.background_train_config
    if config is None:
        return None
    if not is_root(settings.run_dir):
        log.warning("background training of %s skipped: %s is not a run root", config, settings.run_dir)
        return None
    training = BackgroundTraining(settings.run_dir, config, settings.background_train_nice)
    return training if training.needed() else None


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
    app.state.rollout = None
    app.state.training = None
    install_error_handlers(app)
    secured = [Depends(bearer_scheme)] if settings.api_keys else []
    app.include_router(rerank.router, dependencies=secured)
    app.include_router(admin.router, dependencies=secured)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # add_middleware wraps: the last added is the outermost
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics_)
    app.add_middleware(InFlightLimitMiddleware, limiter=limiter, paths=WORK_PATHS)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, paths=KEYED_PATHS, metrics=metrics_)
    app.add_middleware(RequestContextMiddleware, metrics=metrics_)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.main:app_factory`` (settings from the environment)."""
    return create_app()
