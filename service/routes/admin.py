"""``POST /admin/reload``: load the run root's ``current`` version now (behind the API key when keys are set)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.errors import UnavailableError

router = APIRouter(tags=["admin"])


class ReloadResponse(BaseModel):
    outcome: str = Field(description="swapped | unchanged | refused | busy")
    version: str = Field(description="the version served after the reload")
    detail: str = Field("", description="why a version was refused")
    seconds: float = Field(0.0, description="load, probe and swap time")


@router.post("/admin/reload", response_model=ReloadResponse, summary="Serve the run root's current version")
async def reload(request: Request) -> ReloadResponse:
    """Loads the version ``current`` points at beside the served one, probes it and swaps it in; a version that
    fails to load or to answer the probe is refused and the served one stays (``outcome: refused``)."""
    rollout = getattr(request.app.state, "rollout", None)
    if rollout is None:
        raise UnavailableError("the service is starting or stopping; retry shortly")
    done = await rollout.reload()
    return ReloadResponse(outcome=done.outcome, version=done.version, detail=done.detail, seconds=done.seconds)
