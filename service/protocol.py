"""Request and response models of ``POST /rerank`` (pydantic, with OpenAPI examples).

The shape follows Cohere's rerank API where it fits (``candidates`` in, ``results`` of
``{index, relevance_score}`` out, ``top_n``), with the recommender's own inputs (``user_id``,
``history``) and outputs (``degraded``, per-stage ``timings_ms``, the ``preference`` explanation).
Limits that depend on settings (how many candidates, the deadline cap) are checked by the pipeline;
the static shape is checked here. Errors use vLLM's ``{"error": {...}}`` envelope.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_ID_CHARS = 256


def _id_text(value: Any) -> Any:
    """Accept integer ids (``[1, 2]``) as their decimal strings; booleans are not ids."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


ItemId = Annotated[str, BeforeValidator(_id_text), Field(min_length=1, max_length=MAX_ID_CHARS)]
UserId = Annotated[str, BeforeValidator(_id_text), Field(min_length=1, max_length=MAX_ID_CHARS)]

DegradedReason = Literal[
    "cache_unavailable",  # Redis down or erroring: no cache read/write for this request
    "preference_pending",  # no preference yet: answered with the history stand-in while the LLM writes one
    "preference_unavailable",  # generating or encoding the preference failed
    "llm_shed",  # LLM re-ranking would not have finished within the deadline: skipped at once, retriever order
    "llm_timeout",  # LLM re-ranking did not finish within the deadline: retriever/given order
    "llm_unavailable",  # the engine failed: retriever/given order
    "llm_disabled",  # the service runs without an LLM (DPO4REC_LLM_ENABLED=false)
]
# history: the stand-in of a miss; generated: a batch job waited for the LLM's text (preference_wait)
PreferenceSource = Literal["cache", "run", "history", "generated", "none"]


class CandidateItem(BaseModel):
    """A candidate given by its text: an item the catalog may not know (a new item). The LLM scores it from
    this text; the retriever, which has never seen it, gives it the service's prior (``new_item_score``)."""

    model_config = ConfigDict(extra="forbid")

    id: ItemId = Field(description="the item's id, echoed in the results")
    title: str = Field(min_length=1, max_length=300, examples=["The Grand Budapest Hotel (2014)"])
    categories: list[Annotated[str, Field(min_length=1, max_length=60)]] = Field(
        default_factory=list, max_length=20, description="genres or categories", examples=[["Comedy", "Drama"]]
    )
    year: int | None = Field(None, ge=0, le=9999)


class RerankRequest(BaseModel):
    """Rank items for one user: the given ``candidates``, or candidates retrieved from the catalog."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "196", "top_n": 5, "return_items": True},
                {
                    "user_id": "new-user-17",
                    "history": ["50", "181", "258"],
                    "candidates": ["1", "7", "100", "121"],
                    "top_n": 3,
                    "explain": True,
                    "deadline_ms": 1500,
                },
            ]
        },
    )

    user_id: UserId = Field(description="the user to rank for; known users have a stored history")
    history: list[ItemId] | None = Field(
        None,
        description="item ids the user interacted with, newest last; required for an unknown user",
        examples=[["50", "181", "258"]],
    )
    candidates: list[ItemId | CandidateItem] | None = Field(
        None,
        min_length=1,
        description=(
            "items to re-rank (distinct ids): catalog ids, or objects with an id and text (title, categories) "
            "for items the catalog does not know; when absent the service retrieves candidates"
        ),
        examples=[["1", "7", "100", "121"]],
    )
    top_n: int | None = Field(None, ge=1, description="results to return (default: the service's)", examples=[5])
    return_items: bool = Field(False, description="include item metadata (title, genres, year)")
    explain: bool = Field(False, description="include the preference text used for this ranking")
    deadline_ms: int | None = Field(
        None, ge=1, le=600_000, description="time budget; the service's default caps it", examples=[1500]
    )


class ItemInfo(BaseModel):
    title: str
    genres: list[str] = Field(default_factory=list)
    year: int | None = None


Slice = Literal["warm", "new_items", "new_items_shelf", "new_users_1", "new_users_3", "new_users_5"]
ScoredBy = Literal["llm", "retriever", "request"]


class RerankResult(BaseModel):
    item_id: str
    index: int = Field(description="position in the given candidates, or in the retrieved list (0-based)")
    relevance_score: float = Field(
        description="non-increasing down the results: the LLM's label probability of the fused score for re-ranked "
        "items (in (0, 1]); the retriever's score (an inner product) when the LLM did not score the answer"
    )
    item: ItemInfo | None = Field(None, description="metadata, with return_items")


class RerankResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "4f6c1e0ad2a94c7b",
                    "model_version": "ml-100k-20261128-1215",
                    "results": [
                        {
                            "item_id": "100",
                            "index": 2,
                            "relevance_score": 0.41,
                            "item": {"title": "Fargo (1996)", "genres": ["Crime", "Drama"], "year": 1996},
                        },
                        {"item_id": "1", "index": 0, "relevance_score": 0.22, "item": None},
                    ],
                    "degraded": [],
                    "timings_ms": {"preference": 0.8, "retrieve": 0.0, "rerank": 41.3, "total": 43.0},
                    "prompt_tokens": 371,
                    "preference_source": "cache",
                    "preference": None,
                    "slice": "new_items",
                    "scored_by": "llm",
                }
            ]
        }
    )

    request_id: str
    model_version: str
    results: list[RerankResult] = Field(description="sorted by relevance_score, best first")
    degraded: list[DegradedReason] = Field(default_factory=list, description="what was skipped, if anything")
    timings_ms: dict[str, float] = Field(description="milliseconds per pipeline stage, and total")
    prompt_tokens: int | None = Field(
        None, description="prompt tokens the LLM scored for this answer (all candidate orders); null: not LLM-scored"
    )
    preference_source: PreferenceSource = Field(description="where the preference came from")
    preference: str | None = Field(None, description="the preference text used, with explain")
    slice: Slice = Field(
        "warm",
        description="the kind of request, whose fusion weight (llm.json scoring) applies: a list holding items the "
        "retriever never trained on (new_items; new_items_shelf: only such items), a history of at most k items "
        "(new_users_k), else warm",
    )
    scored_by: ScoredBy = Field(
        "retriever",
        description="what ordered the answer: llm (its fused score), retriever (its scores), request (the given order)",
    )


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


class ErrorResponse(BaseModel):
    """The error envelope of every 4xx/5xx answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "unknown item ids in candidates: 999999",
                        "type": "unknown_items",
                        "code": 422,
                        "param": "candidates",
                    },
                    "request_id": "4f6c1e0ad2a94c7b",
                }
            ]
        }
    )

    error: ErrorInfo
    request_id: str | None = None


class CheckResult(BaseModel):
    ok: bool
    detail: str


class ReadinessResponse(BaseModel):
    ready: bool
    model_version: str | None
    checks: dict[str, CheckResult]


class LivenessResponse(BaseModel):
    status: Literal["ok", "failing"] = "ok"
    detail: str | None = Field(default=None, description="why the process cannot recover (with failing)")
