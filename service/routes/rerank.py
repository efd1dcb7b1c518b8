"""``POST /rerank`` and its alias ``POST /v1/rerank``: rank items for one user (SPEC section 7)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import RequestIdDep, StateDep
from service.protocol import ErrorResponse, RerankRequest, RerankResponse

router = APIRouter(tags=["rerank"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key (when keys are configured)"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    422: {"model": ErrorResponse, "description": "invalid request: unknown user or items, duplicates, too many"},
    429: {"model": ErrorResponse, "description": "too many requests in flight; see Retry-After"},
    503: {"model": ErrorResponse, "description": "starting or shutting down"},
}


async def _rerank(request: RerankRequest, state: StateDep, request_id: RequestIdDep) -> RerankResponse:
    state.in_flight += 1  # the version this request started on: a rollout closes it only once this is back to 0
    try:
        return await state.pipeline.rerank(request, request_id)
    finally:
        state.in_flight -= 1


router.add_api_route(
    "/rerank",
    _rerank,
    methods=["POST"],
    response_model=RerankResponse,
    responses=ERRORS,
    summary="Rank items for a user",
    operation_id="rerank",
    description=(
        "Ranks the given `candidates` (or candidates retrieved from the catalog) for `user_id`. The "
        "LLM re-ranks the top K with the user's preference; a slow or failed LLM or cache degrades "
        "the answer (listed in `degraded`) instead of failing it."
    ),
)
router.add_api_route(
    "/v1/rerank",
    _rerank,
    methods=["POST"],
    response_model=RerankResponse,
    responses=ERRORS,
    summary="Rank items for a user (versioned alias of /rerank)",
    operation_id="rerank_v1",
)
