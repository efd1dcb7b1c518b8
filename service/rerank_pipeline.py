"""The ``/rerank`` request flow (SPEC section 7): history -> preference -> candidates -> LLM re-rank -> results.

1. history: the request's (item ids, newest last; the newest ``max_history`` kept) or, for a user of
   the run, ``users.json``; an unknown user without history is a 422 naming it;
2. preference: Redis -> the run's precomputed one -> the history stand-in, the LLM's text generated in
   the background for the next request (see ``service.preferences``);
3. candidates: the given ones (validated: count, unknown ids, duplicates -> 422), or FAISS retrieval
   with the retriever's user vector (last ``max_len`` items + the preference vector, zeros without
   one), excluding what the user has seen;
4. re-rank: the first K (``rerank_k``) candidates scored by the LLM in one forward pass (per candidate
   order, ``llm.json`` "scoring"), the run's label prior removed, fused with the retriever's scores at
   the weight the run chose on validation users (``llm.scoring``); at weight 0 the engine is not
   called. The rest keep their order below (scores: ``service.ranking``). ``service.llm_stage`` owns this step:
   its budget, admission, prompts, scoring and fusion, and the reason when it did not score.

Deadline: the request's ``deadline_ms`` (capped by the service default) bounds the LLM re-rank; no
request waits for a preference generation (a miss is answered with the history stand-in). A stage out
of time or failing degrades (flagged), never fails the request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from llm.prompts import HistoryItem
from llm.scoring import ScoringSpec
from retrieval.catalog import Item
from retrieval.content import text_vectors
from rundir.items import prompt_item
from rundir.reader import Artifacts
from service.batching import Coalescer
from service.engines import rerank_k
from service.errors import DuplicateItemsError, TooManyItemsError, UnknownItemsError, UnknownUserError
from service.language_model import LanguageModel
from service.llm_stage import LLMStage
from service.preferences import PreferenceService
from service.protocol import (
    CandidateItem,
    ItemInfo,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoredBy,
    Slice,
)
from service.ranking import final_order
from service.settings import Settings
from service.telemetry import ServiceMetrics

log = logging.getLogger(__name__)

NEW_USER_ITEMS = (1, 3, 5)  # a history of at most k items is the slice new_users_k (training.cold_start's ks)


@dataclass
class _Clock:
    """Per-request deadline and stage timings."""

    deadline_s: float
    start: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int | None = None  # what the LLM scored, once it has

    @property
    def deadline(self) -> float:
        """When the request's deadline passes, in ``time.perf_counter()`` seconds."""
        return self.start + self.deadline_s

    @contextmanager
    def stage(self, name: str, metrics: ServiceMetrics) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - begin
            self.timings_ms[name] = round(seconds * 1000, 3)
            metrics.stage_seconds.labels(stage=name).observe(seconds)


@dataclass(frozen=True)
class Candidate:
    item_id: str
    index: int | None  # catalog index; None: a new item, known only by the text the request gave
    text: HistoryItem  # what the LLM reads
    position: int = 0  # in the request's candidate list, or the retrieved one (the answer's ``index``)


class RerankPipeline:
    def __init__(
        self,
        artifacts: Artifacts,
        settings: Settings,
        preferences: PreferenceService,
        llm: LanguageModel | None,
        metrics: ServiceMetrics,
        scoring: ScoringSpec | None = None,
    ):
        self.artifacts = artifacts
        self.settings = settings
        self.preferences = preferences
        self.llm = llm
        self.metrics = metrics
        # the head the LLM scores: the run's resolved K, within the labels the engine's LanguageModel prepared
        self.rerank_k = min(rerank_k(settings, artifacts.llm), llm.cfg.rerank_k if llm else 10**9)
        self.llm_stage = LLMStage(llm, settings, metrics)
        self.pref_dim = artifacts.retriever.cfg.pref_dim
        self.item_vectors = artifacts.retriever.item_vectors()  # (N+1, H): given candidates' retriever scores
        batch = metrics.retriever_batch_size.observe
        # (history, preference vector) -> user vector (H,)
        self._query = Coalescer(self._user_vectors, on_batch=batch)
        # (history, preference vector, k, banned) -> the top k (scores, items): one forward pass and one FAISS
        # search, in one worker thread hop, for every request that asks at once
        self._search = Coalescer(self._search_many, on_batch=batch)
        self._texts: dict[int, HistoryItem] = {}  # catalog index -> prompt item, built once (see ``_text``)
        # what the run chose (llm.json "scoring"), or the operator's override (service.engines.served_scoring);
        # weight 0: the LLM did not help on validation, and it is never called
        self.scoring = scoring or artifacts.llm.scoring
        self.content = artifacts.content  # new items' text -> item vectors (None: a run without a tower)

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

    def _candidates(self, req: RerankRequest) -> list[Candidate] | None:
        """Given candidates: catalog ids (an unknown one is a 422 naming it), or text-carrying items (a new
        item when the catalog does not know its id)."""
        if req.candidates is None:
            return None
        if len(req.candidates) > self.settings.max_candidates:
            raise TooManyItemsError("candidates", len(req.candidates), self.settings.max_candidates)
        ids = [c.id if isinstance(c, CandidateItem) else c for c in req.candidates]
        duplicates = [i for i, n in Counter(ids).items() if n > 1]
        if duplicates:
            raise DuplicateItemsError("candidates", duplicates)
        catalog = self.artifacts.catalog
        unknown = [c for c in req.candidates if isinstance(c, str) and c not in catalog]
        if unknown:
            raise UnknownItemsError("candidates", unknown)
        return [
            self._candidate(catalog.indices_of([item_id])[0], j)
            if item_id in catalog
            else Candidate(item_id, None, _text_of(entry), j)
            for j, (item_id, entry) in enumerate(zip(ids, req.candidates, strict=True))
        ]

    def _candidate(self, index: int, position: int) -> Candidate:
        return Candidate(self.artifacts.catalog[index].item_id, index, self._text(index), position)

    def _text(self, index: int) -> HistoryItem:
        """The prompt item of a catalog index, built once per pipeline: a request reads ~100 retrieved items and
        its history, and building them anew was a third of an answer's CPU at fusion weight 0."""
        text = self._texts.get(index)
        if text is None:
            text = self._texts[index] = prompt_item(self.artifacts.catalog[index])
        return text

    # ---- stages -------------------------------------------------------------------------------------

    def _items(self, indices: list[int]) -> list[HistoryItem]:
        return [self._text(i) for i in indices]

    def _user_vectors(self, users: Sequence[tuple[list[int], np.ndarray | None]]) -> np.ndarray:
        """The retriever's user vectors (B, H), one forward pass: each user's last ``max_len`` items + their
        preference vector (zeros without one). Called through ``self._query`` (concurrent requests coalesced)."""
        retriever = self.artifacts.retriever
        pref = None
        if self.pref_dim:
            zeros = np.zeros(self.pref_dim, np.float32)
            pref = np.stack(
                [zeros if v is None or v.size == 0 else np.asarray(v, np.float32).reshape(-1) for _, v in users]
            )
        return retriever.user_vectors([history[-retriever.cfg.max_len :] for history, _ in users], pref)

    async def _retrieve(
        self, history: list[int], vector: np.ndarray | None, k: int
    ) -> tuple[list[Candidate], np.ndarray]:
        """Top-k unseen items for the user, best first, and their retriever scores."""
        banned = set(history) | self.artifacts.retired  # seen, or taken out of retrieval (``items remove``)
        k = min(k, self.artifacts.index.num_items - len(banned))
        if k < 1:
            return [], np.empty(0)
        scores, items = await self._search((history, vector, k, banned))  # (k,), (k,)
        keep = items > 0
        found = [self._candidate(i, j) for j, i in enumerate(items[keep].tolist())]
        return found, scores[keep].astype(np.float64)

    def _search_many(
        self, queries: Sequence[tuple[list[int], np.ndarray | None, int, set[int]]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query's top k unseen items (scores (k,), items (k,)): one forward pass for all the user vectors
        and one FAISS search. Called through ``self._search`` (concurrent requests coalesced)."""
        vectors = self._user_vectors([(history, vector) for history, vector, _, _ in queries])  # (B, H)
        k = max(q[2] for q in queries)
        scores, items = self.artifacts.index.search(vectors, k, exclude=[q[3] for q in queries])  # (B, k)
        return [(scores[b, : q[2]], items[b, : q[2]]) for b, q in enumerate(queries)]

    async def _scores_of(
        self, history: list[int], vector: np.ndarray | None, candidates: list[Candidate]
    ) -> np.ndarray:
        """The retriever's scores of given candidates (inner products, as the index would give them). A new
        item, which the retriever has never seen, is scored through its content vector (its text through the
        run's content tower, as ``dpo4rec items add`` would store it); a run without a tower gives it the prior
        ``new_item_score`` of the known ones."""
        query = await self._query((history, vector))
        known = [c.index for c in candidates if c.index is not None]
        scores = self.item_vectors[known] @ query if known else np.zeros(0)
        new = [c.text for c in candidates if c.index is None]
        if new and self.content is not None:
            new_scores = iter((await asyncio.to_thread(self._content_vectors, new)) @ query)
        else:
            prior = float(getattr(np, self.settings.new_item_score)(scores)) if known else 0.0  # min | mean | max
            new_scores = iter([prior] * len(new))
        values = iter(scores.tolist())
        return np.array([next(values) if c.index is not None else next(new_scores) for c in candidates], np.float64)

    def _content_vectors(self, texts: list[HistoryItem]) -> np.ndarray:
        """Content-tower vectors (M, H) of new items' texts, each encoded once per process (LRU by text)."""
        return np.stack([self._content_vector(t.title, tuple(t.genres), t.year) for t in texts])

    @functools.lru_cache(maxsize=4096)  # noqa: B019  # one pipeline per service version: the cache goes with it
    def _content_vector(self, title: str, genres: tuple[str, ...], year: int | None) -> np.ndarray:
        assert self.content is not None
        return text_vectors(self.content, self.preferences.encoder, [Item("", title, genres, year)])[0]  # (H,)

    def _slice(self, history: list[int], candidates: Sequence[Candidate]) -> tuple[Slice, ScoringSpec]:
        """The request's slice and its scoring (``llm.scoring`` slices): a list holding items the retriever never
        trained on (given by text, or added by ``dpo4rec items add``) first, then a short history, else warm."""
        new = sum(1 for c in candidates if c.index is None or c.index > self.artifacts.trained_items)
        name: Slice = "warm"
        if new:
            name = "new_items_shelf" if new == len(candidates) else "new_items"
        elif len(history) <= NEW_USER_ITEMS[-1]:
            name = cast(Slice, f"new_users_{next(k for k in NEW_USER_ITEMS if len(history) <= k)}")
        return name, self.scoring.for_slice(name)

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
            history_items = self._items(history)  # oldest first, as the LLM reads them
            resolved = await self.preferences.resolve(req.user_id, history_items, request_id=request_id)
            degraded |= resolved.degraded
        self.metrics.preference_source.labels(source=resolved.source).inc()
        vector = resolved.preference.vector if resolved.preference is not None else None
        text = resolved.preference.text if resolved.preference is not None else ""

        # the retriever has a say in the order unless the slice is scored by the LLM alone (weight None): given
        # candidates are then sorted by it too, new items by their content vectors, before the LLM sees the top K
        with clock.stage("retrieve", self.metrics):
            retriever_scores = None
            if given is not None:
                candidates = given
                slice_name, scoring = self._slice(history, candidates)
                if scoring.weight is not None and candidates:
                    retriever_scores = await self._scores_of(history, vector, candidates)
                    by_score = np.argsort(-retriever_scores, kind="stable")
                    candidates, retriever_scores = [candidates[j] for j in by_score], retriever_scores[by_score]
            else:
                k = max(settings.retrieve_k, top_n)
                candidates, retriever_scores = await self._retrieve(history, vector, k)
                slice_name, scoring = self._slice(history, candidates[: self.rerank_k])

        with clock.stage("rerank", self.metrics):
            try:
                head = [c.text for c in candidates[: self.rerank_k]]
                stand_in = resolved.source == "history"
                stage = await self.llm_stage.run(
                    text, history_items, head, retriever_scores, clock.deadline, request_id, scoring, stand_in
                )
            finally:
                resolved.release()  # a background generation this request caused may start now
        if stage.flag is not None:
            degraded.add(stage.flag)
        probabilities, clock.prompt_tokens = stage.probabilities, stage.prompt_tokens

        order, scores = final_order(len(candidates), probabilities, retriever_scores)
        results = [
            self._result(candidates[j], candidates[j].position, score, req.return_items)
            for j, score in zip(order[:top_n], scores[:top_n], strict=True)
        ]
        clock.timings_ms["total"] = round((time.perf_counter() - clock.start) * 1000, 3)
        for reason in degraded:
            self.metrics.degraded.labels(reason=reason).inc()
        scored_by: ScoredBy = (
            "llm" if probabilities is not None else "retriever" if retriever_scores is not None else "request"
        )
        self.metrics.answers.labels(slice=slice_name, scorer=scored_by).inc()
        return RerankResponse(
            request_id=request_id,
            model_version=self.artifacts.version,
            results=results,
            degraded=sorted(degraded),  # type: ignore[arg-type]
            timings_ms=clock.timings_ms,
            prompt_tokens=clock.prompt_tokens,
            preference_source=resolved.source,
            preference=text if req.explain and resolved.preference is not None else None,
            slice=slice_name,
            scored_by=scored_by,
        )

    def _result(self, candidate: Candidate, position: int, score: float, with_item: bool) -> RerankResult:
        text = candidate.text
        info = ItemInfo(title=text.title, genres=list(text.genres), year=text.year) if with_item else None
        return RerankResult(item_id=candidate.item_id, index=position, relevance_score=score, item=info)


def _text_of(entry: CandidateItem | str) -> HistoryItem:
    assert isinstance(entry, CandidateItem)  # an unknown plain id was refused above
    return HistoryItem(title=entry.title, genres=tuple(entry.categories), year=entry.year)
