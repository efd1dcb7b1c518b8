"""The LLM stage of one ``/rerank`` request: the head of the candidate list scored by the LLM, or why not.

One object owns what the stage decides, in this order (SPEC section 7, step 4):

1. ``disabled``: the service runs without an LLM (``llm_disabled``);
2. ``skipped``: the request's slice scores at fusion weight 0, or fewer than two candidates: the retriever's
   order is the answer and the engine is not called (no flag: nothing degraded);
3. the budget: what is left of the request's deadline, less ``fallback_reserve_ms`` (the answer without the LLM);
4. the early shed (``admission_early``): even the shortest prompts of this shape would finish late, so none are
   built (``llm_shed``; ``LanguageModel.least_tokens``, ``benchmarks/shed_path.py``);
5. the prompts (``LanguageModel.rerank_prompts``: one per candidate order; a miss's history stand-in cut to
   ``stand_in_prompt_chars``); a failure to build them is ``llm_unavailable``;
6. the admission ticket (``service.admission``): work that would finish after the deadline is shed before the
   engine sees it (``llm_shed``); no budget left at all is ``llm_timeout``;
7. scoring on the engine under the budget: out of time (in the engine or waiting for it) is ``llm_timeout``, and
   tells admission its rate was optimistic (``Admission.missed``); an engine failure is ``llm_unavailable``;
8. fusion with the retriever's scores at the slice's weight (``llm.scoring.fused_scores``), as probabilities
   over the K labels (``llm.scoring.label_probabilities``).

Every outcome but ``scored`` leaves the candidates in their incoming order (``service.ranking``); the request
never fails because of this stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np

from llm.prompts import HistoryItem
from llm.scoring import ScoringSpec, fused_scores, label_probabilities
from service.admission import Late
from service.language_model import LanguageModel, LLMError
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)

Outcome = Literal["scored", "shed", "timeout", "unavailable", "skipped", "disabled"]
# the reason each outcome adds to a response's ``degraded`` (None: nothing degraded)
FLAGS: dict[Outcome, str | None] = {
    "scored": None,
    "skipped": None,
    "shed": "llm_shed",
    "timeout": "llm_timeout",
    "unavailable": "llm_unavailable",
    "disabled": "llm_disabled",
}


@dataclass(frozen=True)
class LLMStageResult:
    """What the LLM stage did for one request."""

    outcome: Outcome
    probabilities: np.ndarray | None = None  # (K,) fused, summing to 1; only when ``scored``
    prompt_tokens: int | None = None  # the prompts the engine scored; only when ``scored``

    @property
    def flag(self) -> str | None:
        """The reason added to the response's ``degraded``, or None."""
        return FLAGS[self.outcome]


class LLMStage:
    """The LLM stage of a request, built once per pipeline (``service.rerank_pipeline``)."""

    def __init__(self, llm: LanguageModel | None, settings: Settings, metrics: ServiceMetrics):
        self.llm = llm
        self.settings = settings
        self.metrics = metrics

    def budget(self, deadline: float) -> float:
        """Seconds the LLM stage may take: what is left until ``deadline`` (``time.perf_counter()`` seconds), less
        the answer without it."""
        return deadline - time.perf_counter() - self.settings.fallback_reserve_ms / 1000

    async def run(
        self,
        preference: str,
        history: Sequence[HistoryItem],
        head: Sequence[HistoryItem],
        retriever_scores: np.ndarray | None,
        deadline: float,
        request_id: str,
        scoring: ScoringSpec,
        stand_in: bool = False,
    ) -> LLMStageResult:
        """Score ``head`` (the first K candidates, as the LLM reads them) for the user of ``history`` (oldest first;
        the prompt shows its last ``max_recent``) under ``scoring`` (the request's slice), by ``deadline``.
        ``retriever_scores``: the head's (K,), fused with the LLM's (None: the slice is scored by the LLM alone).
        ``stand_in``: ``preference`` is a miss's history stand-in, cut to ``stand_in_prompt_chars``."""
        llm, settings = self.llm, self.settings
        if llm is None:
            return LLMStageResult("disabled")
        if not scoring.uses_llm or len(head) < 2:
            return LLMStageResult("skipped")  # weight 0 on this slice, or nothing to re-rank: no engine call
        early = self.budget(deadline)
        if settings.admission and settings.admission_early and early > 0:
            if not llm.admission.admits(llm.least_tokens(len(head), scoring), early):
                return LLMStageResult("shed")  # even the shortest prompts of this shape would be late: none built
        max_recent = llm.cfg.prompt.max_recent
        recent = list(history[-max_recent:]) if max_recent else []
        try:
            cut = settings.stand_in_prompt_chars if stand_in else None
            prepared = llm.rerank_prompts(preference, recent, list(head), scoring, cut)
        except LLMError as e:
            log.warning("re-rank prompts failed: %s", e)
            return LLMStageResult("unavailable")
        budget = self.budget(deadline)
        if budget <= 0:
            return LLMStageResult("timeout")
        ticket = llm.admission.admit(prepared.total_tokens, budget) if settings.admission else None
        if settings.admission and ticket is None:
            return LLMStageResult("shed")  # it would finish too late: the retriever answers now, no engine work queued
        try:
            with ticket or nullcontext():
                scored = llm.score(prepared, scoring, request_id, time.perf_counter() + budget, ticket)
                logprobs = await asyncio.wait_for(scored, timeout=budget)  # (K,)
        except (asyncio.TimeoutError, Late):  # out of time in the engine, or while waiting for it
            if settings.admission:
                llm.admission.missed()  # admitted yet late: the engine is slower than estimated
            return LLMStageResult("timeout")
        except LLMError as e:
            log.warning("re-rank scoring failed: %s", e)
            return LLMStageResult("unavailable")
        self.metrics.rerank_prompt_tokens.observe(prepared.total_tokens)
        r = None if retriever_scores is None else retriever_scores[: len(head)]
        probabilities = label_probabilities(fused_scores(r, logprobs, scoring.weight))
        return LLMStageResult("scored", probabilities, prepared.total_tokens)
