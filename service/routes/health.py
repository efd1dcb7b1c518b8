"""Probes: ``GET /livez`` (the process can recover) and ``GET /readyz`` (it answers correctly, with each check).

SPEC section 9: ``/readyz`` is "this pod answers correctly", so it stays 200 while a dead engine is restarted
(the retriever answers, flagged ``llm_unavailable``); ``/livez`` fails only when the process cannot recover on
its own, an engine whose restarts gave up (``service.supervisor``), so that Kubernetes restarts the pod. It
reads one flag: a liveness probe stays cheap.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import LimiterDep, MaybeStateDep, ServiceState, SettingsDep
from service.protocol import CheckResult, LivenessResponse, ReadinessResponse

router = APIRouter(tags=["health"])


@router.get(
    "/livez",
    response_model=LivenessResponse,
    response_model_exclude_none=True,
    summary="Liveness",
    responses={503: {"model": LivenessResponse, "description": "an engine's restarts gave up: restart the pod"}},
)
async def livez(state: MaybeStateDep) -> JSONResponse:
    """200 unless an engine's restarts gave up (``engine_restart_max_failures`` in a row): then 503."""
    supervisor = state.supervisor if state is not None else None
    if supervisor is not None and supervisor.failed:
        body = LivenessResponse(status="failing", detail=f"engine {supervisor.detail()}")
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(LivenessResponse().model_dump(exclude_none=True))


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    summary="Readiness",
    responses={503: {"model": ReadinessResponse, "description": "not ready; see the failing checks"}},
)
async def readyz(request: Request, state: MaybeStateDep, settings: SettingsDep, limiter: LimiterDep) -> JSONResponse:
    """200 when artifacts are loaded, the engine is alive or being restarted (or disabled) and Redis answers (or
    is optional)."""
    checks: dict[str, CheckResult] = {}
    if state is None:
        checks["artifacts"] = CheckResult(ok=False, detail="not loaded")
    else:
        checks["artifacts"] = CheckResult(ok=True, detail=f"run {state.artifacts.root.name}")
        if state.supervisor is None:
            checks["engine"] = CheckResult(ok=True, detail="disabled (retriever order only)")
        else:  # alive, restarting or failed, the pod answers (the retriever while the engine is down)
            checks["engine"] = CheckResult(ok=True, detail=state.supervisor.detail())
        checks["rerank"] = CheckResult(ok=True, detail=_rerank_mode(state))
        rollout = getattr(request.app.state, "rollout", None)
        refused = f"; refused {rollout.last_refusal}" if rollout is not None and rollout.last_refusal else ""
        checks["version"] = CheckResult(ok=True, detail=f"serving {state.artifacts.version}{refused}")
        training = getattr(request.app.state, "training", None)
        if training is not None:  # the next version, training in the background (service.background)
            checks["training"] = CheckResult(ok=True, detail=training.describe())
        reachable = await state.cache.ping()
        where = "embedded" if state.redis_server is not None else "external"
        checks["redis"] = CheckResult(
            ok=reachable or settings.redis_optional,
            detail=f"{where}, "
            + ("reachable" if reachable else "unreachable")
            + (" (optional)" if settings.redis_optional else ""),
        )
    checks["accepting"] = CheckResult(ok=not limiter.closing, detail="draining" if limiter.closing else "yes")
    ready = all(check.ok for check in checks.values())
    body = ReadinessResponse(ready=ready, model_version=state.artifacts.version if state else None, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _rerank_mode(state: ServiceState) -> str:
    """How /rerank orders the candidates: what the run chose (llm.json "scoring", or the settings' override)."""
    scoring = state.pipeline.scoring
    if state.llm is None:
        return "retriever order (LLM disabled)"
    if not scoring.uses_llm:
        if scoring != state.artifacts.llm.scoring:
            return "retriever order: fusion weight 0 set by the settings (DPO4REC_FUSION_WEIGHT); no engine call"
        return "retriever order: the run chose fusion weight 0 (the LLM did not help on validation); no engine call"
    prior = "label prior removed" if scoring.log_prior is not None else "raw label scores"
    how = "LLM order" if scoring.weight is None else f"retriever + {scoring.weight:g} x LLM"
    if scoring.slice_weights:  # per slice (training.cold_start): the engine is called only where above 0
        on = [f"{name} {w:g}" for name, w in sorted(scoring.slice_weights.items()) if w > 0]
        how = f"per slice, LLM on: {', '.join(on) or 'none'}; other slices: {how}"
    return f"{how}, {prior}, {scoring.permutations} candidate order(s)"
