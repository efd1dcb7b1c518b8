"""Typed accessors for the objects the lifespan puts on ``app.state``, and ``Annotated`` aliases.

After vLLM's ``api_server.py`` (tiny accessors over ``app.state``) and full-stack-fastapi-template's
``api/deps.py`` (aliases so that handlers read like their signature). The accessors are ``async def``:
FastAPI runs a plain ``def`` dependency in a worker thread, three thread hops per ``/rerank`` for a
dictionary lookup each.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import UnavailableError
from service.limits import InFlightLimiter
from service.rerank_pipeline import RerankPipeline
from service.runtime import ServiceState
from service.settings import Settings
from service.telemetry import ServiceMetrics


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_limiter(request: Request) -> InFlightLimiter:
    limiter: InFlightLimiter = request.app.state.limiter
    return limiter


async def get_state_or_none(request: Request) -> ServiceState | None:
    return getattr(request.app.state, "service", None)


async def get_state(request: Request) -> ServiceState:
    state = await get_state_or_none(request)
    if state is None:
        raise UnavailableError("the service is starting or stopping; retry shortly")
    return state


async def get_pipeline(state: Annotated[ServiceState, Depends(get_state)]) -> RerankPipeline:
    return state.pipeline


async def get_request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id") or "")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
LimiterDep = Annotated[InFlightLimiter, Depends(get_limiter)]
StateDep = Annotated[ServiceState, Depends(get_state)]
MaybeStateDep = Annotated[ServiceState | None, Depends(get_state_or_none)]
PipelineDep = Annotated[RerankPipeline, Depends(get_pipeline)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
