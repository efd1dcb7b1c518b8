"""The ``/rerank`` request flow (SPEC section 7): history -> preference -> candidates -> LLM re-rank -> results.

1. history: the request's (item ids, newest last; the newest ``max_history`` kept) or, for a user of
   the run, ``users.json``; an unknown user without history is a 422 naming it;
2. preference: Redis -> the run's precomputed one -> LLM generation (see ``service.preferences``);
3. candidates: the given ones (validated: count, unknown ids, duplicates -> 422), or FAISS retrieval
   with the retriever's user vector (last ``max_len`` items + the preference vector, zeros without
   one), excluding what the user has seen;
4. re-rank: the first K (``rerank_k``) candidates scored by the LLM in one forward pass; the rest
   keep their order below (scores: ``service.ranking``).

Deadline: the request's ``deadline_ms`` (capped by the service default) bounds the LLM stages. Waiting
for a preference generation may use the time left minus a reserve for re-ranking; re-ranking may use
what is left. A stage out of time or failing degrades (flagged), never fails the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from llm.prompts import HistoryItem
from service.artifacts import Artifacts
from service.errors import DuplicateItemsError, TooManyItemsError, UnknownItemsError, UnknownUserError
from service.language_model import LanguageModel, LLMError
from service.metrics import ServiceMetrics
from service.preferences import PreferenceService
from service.protocol import ItemInfo, RerankRequest, RerankResponse, RerankResult
from service.ranking import final_order
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Clock:
    """Per-request deadline and stage timings."""

    deadline_s: float
    start: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.start)

    @contextmanager
    def stage(self, name: str, metrics: ServiceMetrics) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - begin
            self.timings_ms[name] = round(seconds * 1000, 3)
            metrics.stage_seconds.labels(stage=name).observe(seconds)


class RerankPipeline:
    def __init__(
        self,
        artifacts: Artifacts,
        settings: Settings,
        preferences: PreferenceService,
        llm: LanguageModel | None,
        metrics: ServiceMetrics,
    ):
        self.artifacts = artifacts
        self.settings = settings
        self.preferences = preferences
        self.llm = llm
        self.metrics = metrics
        self.rerank_k = min(settings.rerank_k or artifacts.llm.rerank_k, llm.cfg.rerank_k if llm else 10**9)
        self.pref_dim = artifacts.retriever.cfg.pref_dim

    # ---- validation ---------------------------------------------------------------------------------

    def _indices(self, field_name: str, item_ids: list[str]) -> list[int]:
        catalog = self.artifacts.catalog
        unknown = [i for i in dict.fromkeys(item_ids) if i not in catalog]
        if unknown:
            raise UnknownItemsError(field_name, unknown)
        return catalog.indices_of(item_ids)

    def _history(self, req: RerankRequest) -> list[int]:
        if req.history:
            return self._indices("history", req.history[-self.settings.max_history :])
        stored = self.artifacts.users.get(req.user_id)
        if stored is None:
            raise UnknownUserError(req.user_id)
        return stored

    def _candidates(self, req: RerankRequest) -> list[int] | None:
        if req.candidates is None:
            return None
        if len(req.candidates) > self.settings.max_candidates:
            raise TooManyItemsError("candidates", len(req.candidates), self.settings.max_candidates)
        indices = self._indices("candidates", req.candidates)
        counts = Counter(req.candidates)
        duplicates = [i for i, n in counts.items() if n > 1]
        if duplicates:
            raise DuplicateItemsError("candidates", duplicates)
        return indices

    # ---- stages -------------------------------------------------------------------------------------

    def _items(self, indices: list[int]) -> list[HistoryItem]:
        catalog = self.artifacts.catalog
        return [HistoryItem(title=catalog[i].title, genres=catalog[i].genres, year=catalog[i].year) for i in indices]

    def _retrieve(self, history: list[int], vector: np.ndarray | None, k: int) -> list[int]:
        """Top-k unseen items for the user, best first (runs in a worker thread: torch + FAISS)."""
        retriever = self.artifacts.retriever
        seq = [history[-retriever.cfg.max_len :]]
        pref = None
        if self.pref_dim:
            pref = (vector if vector is not None else np.zeros(self.pref_dim, np.float32)).reshape(1, -1)
        query = retriever.user_vectors(seq, pref)  # (1, H)
        seen = set(history)
        k = min(k, self.artifacts.index.num_items - len(seen))
        if k < 1:
            return []
        _, items = self.artifacts.index.search(query, k, exclude=[seen])  # (1, k)
        return [int(i) for i in items[0] if i > 0]

    async def _rerank(
        self,
        preference: str,
        history: list[int],
        candidates: list[int],
        clock: _Clock,
        request_id: str,
        degraded: set[str],
    ) -> np.ndarray | None:
        if self.llm is None:
            degraded.add("llm_disabled")
            return None
        head = candidates[: self.rerank_k]
        if len(head) < 2:
            return None  # one candidate: nothing to re-rank
        budget = clock.remaining()
        if budget <= 0:
            degraded.add("llm_timeout")
            return None
        recent = self._items(history[-self.llm.cfg.prompt.max_recent :]) if self.llm.cfg.prompt.max_recent else []
        try:
            return await asyncio.wait_for(
                self.llm.score(preference, recent, self._items(head), request_id), timeout=budget
            )
        except asyncio.TimeoutError:
            degraded.add("llm_timeout")
        except LLMError as e:
            log.warning("re-rank scoring failed: %s", e)
            degraded.add("llm_unavailable")
        return None

    # ---- the flow -----------------------------------------------------------------------------------

    async def rerank(self, req: RerankRequest, request_id: str) -> RerankResponse:
        settings = self.settings
        deadline_ms = min(req.deadline_ms or settings.deadline_ms, settings.deadline_ms)
        clock = _Clock(deadline_s=deadline_ms / 1000)
        history = self._history(req)
        given = self._candidates(req)
        top_n = req.top_n or settings.default_top_n
        degraded: set[str] = set()

        with clock.stage("preference", self.metrics):
            remaining = clock.remaining()
            reserve = min(settings.rerank_reserve_ms / 1000, remaining / 2) if self.llm is not None else 0.0
            resolved = await self.preferences.resolve(
                req.user_id, self._items(history), budget_s=remaining - reserve, request_id=request_id
            )
            degraded |= resolved.degraded
        self.metrics.preference_source.labels(source=resolved.source).inc()
        vector = resolved.preference.vector if resolved.preference is not None else None
        text = resolved.preference.text if resolved.preference is not None else ""

        with clock.stage("retrieve", self.metrics):
            if given is not None:
                candidates = given
            else:
                k = max(settings.retrieve_k, top_n)
                candidates = await asyncio.to_thread(self._retrieve, history, vector, k)

        with clock.stage("rerank", self.metrics):
            probabilities = await self._rerank(text, history, candidates, clock, request_id, degraded)

        order, scores = final_order(len(candidates), probabilities)
        results = [
            self._result(candidates[j], j, score, req.return_items)
            for j, score in zip(order[:top_n], scores[:top_n], strict=True)
        ]
        clock.timings_ms["total"] = round((time.perf_counter() - clock.start) * 1000, 3)
        for reason in degraded:
            self.metrics.degraded.labels(reason=reason).inc()
        return RerankResponse(
            request_id=request_id,
            model_version=self.artifacts.version,
            results=results,
            degraded=sorted(degraded),  # type: ignore[arg-type]
            timings_ms=clock.timings_ms,
            preference_source=resolved.source,
            preference=text if req.explain and resolved.preference is not None else None,
        )

    def _result(self, index: int, position: int, score: float, with_item: bool) -> RerankResult:
        item = self.artifacts.catalog[index]
        info = ItemInfo(title=item.title, genres=list(item.genres), year=item.year) if with_item else None
        return RerankResult(item_id=item.item_id, index=position, relevance_score=score, item=info)
