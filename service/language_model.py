"""The service's view of the LLM: its two jobs on the in-process vLLM ``AsyncLLM`` or a vLLM server (``llm.remote``).

- ``preference``: history -> preference text (generation; prompt from ``llm.prompts.preference_messages``);
- ``score``: preference + recent history + lettered candidates -> one probability per candidate, read
  in ONE forward pass from the next-token log-probabilities of the labels (``llm.engine.ascore_labels``,
  LlamaRec's verbalizer).

The prompts are built by ``llm.prompts`` exactly as in training. Each call has its own vLLM request
id (``{request_id}-{job}-{random}``); a cancelled call (deadline) aborts its engine request. Each job
has its engine (``service.runtime`` starts one per distinct set of weights: merged adapters by default,
or one engine with vLLM multi-LoRA, ``loras``). An engine that died is restarted by ``service.supervisor``,
which swaps the new one in (``replace_engine``); until then a call on it fails at once (``EngineUnavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm.engine import GenerationConfig, agenerate, ascore_labels, engine_alive, is_engine_dead, make_lora
from llm.labels import Label, candidate_labels
from llm.prompts import HistoryItem, PromptConfig, preference_messages, render
from llm.rerank_prompts import RerankPromptBuilder, RerankPrompts
from llm.scoring import ScoringSpec, item_logprobs
from service.admission import Admission, Late, Ticket
from service.telemetry import ServiceMetrics

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

    from llm.engine import AsyncEngine

log = logging.getLogger(__name__)


class LLMError(RuntimeError):
    """The engine could not serve a call (dead engine, rejected prompt, no log-probs)."""


class EngineUnavailable(LLMError):
    """The job's engine is dead: it died under the call or before it (``service.supervisor`` restarts it)."""


@dataclass(frozen=True)
class LLMJobConfig:
    prompt: PromptConfig
    generation: GenerationConfig  # for the preference job
    rerank_k: int  # labels prepared at start: the most candidates one prompt scores
    loras: dict[str, Path | None]  # job -> LoRA folder applied per request (None: the engine's own weights)
    # job -> the served model name of its weights on a remote engine (llm.remote: a call names them); empty in process
    served: dict[str, str] = field(default_factory=dict)


class LanguageModel:
    """Preference generation and label scoring on the jobs' ``AsyncLLM`` engines (owned by ``service.runtime``)."""

    def __init__(
        self,
        engines: dict[str, AsyncEngine],
        tokenizer: Any,
        cfg: LLMJobConfig,
        metrics: ServiceMetrics,
        admission: Admission | None = None,
    ):
        self.engines = engines  # job -> engine; jobs may share one
        self._aborts: set[asyncio.Future[None]] = set()  # engine aborts under way (kept referenced)
        self._least: dict[tuple[int, int], int] = {}  # (k, orders) -> least_tokens
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.metrics = metrics
        self.labels: list[Label] = candidate_labels(tokenizer, cfg.rerank_k)
        self.prompts = RerankPromptBuilder(tokenizer, cfg.prompt, self.labels)  # what benchmarks replay too
        # what the engine has admitted and how fast it goes (prompt tokens/s; measure_rate seeds it)
        self.admission = admission or Admission(rate=200.0)
        metrics.watch_admission(lambda: self.admission.pending, lambda: self.admission.rate)
        self.loras: dict[str, LoRARequest | None] = {
            job: make_lora(job, path, lora_id=i + 1) if path is not None else None
            for i, (job, path) in enumerate(sorted(cfg.loras.items()))
        }
        for i, (job, name) in enumerate(sorted(cfg.served.items())):  # a remote engine: the weights by served name
            self.loras[job] = make_lora(name, name, lora_id=i + 1)

    @property
    def distinct_engines(self) -> list[AsyncEngine]:
        return list({id(e): e for e in self.engines.values()}.values())

    @property
    def alive(self) -> bool:
        return all(engine_alive(e) for e in self.distinct_engines)

    def unfinished_requests(self) -> int:
        return sum(int(e.get_num_unfinished_requests()) for e in self.distinct_engines)

    def _engine(self, job: str) -> AsyncEngine:
        engine = self.engines.get(job)
        if engine is None:
            raise LLMError(f"{job}: no engine was started for this job")
        if not engine_alive(engine):
            raise EngineUnavailable(f"{job}: the engine is dead, restarting")
        return engine

    def replace_engine(self, old: AsyncEngine, new: AsyncEngine) -> None:
        """A restarted engine takes the place of the dead ``old`` for every job it served (``service.supervisor``);
        calls made from now on go to it."""
        for job, engine in self.engines.items():
            if engine is old:
                self.engines[job] = new

    async def _call(
        self,
        job: str,
        request_id: str,
        coro: Any,
        tokens: int,
        deadline: float | None = None,
        ticket: Ticket | None = None,
    ) -> Any:
        """``coro`` (an engine call not yet started) under admission's accounting (part of ``ticket`` when it
        was admitted); a re-rank prompt waits for an engine slot first and raises ``Late`` when its turn comes
        too late for ``deadline`` (background generations are bounded by ``preference_workers`` instead)."""
        gauge = self.metrics.llm_in_flight.labels(job=job)
        gauge.inc()
        started = False
        try:
            with self._accounted(job, tokens, ticket):
                async with self.admission.engine_slot(tokens, deadline) if job == "rerank" else nullcontext():
                    started = True
                    self.metrics.llm_calls.labels(job=job).inc()
                    return await coro
        except asyncio.CancelledError:
            if started:
                # the deadline passed: make sure the engine stops working on it (agenerate also aborts),
                # without holding up the answer the caller gives instead
                task = asyncio.ensure_future(self._abort(self.engines[job], request_id))
                self._aborts.add(task)
                task.add_done_callback(self._aborts.discard)
            raise
        except Late:
            raise
        except Exception as e:  # vLLM's errors (VLLMError, EngineDeadError, ...) share no narrower base
            engine = self.engines.get(job)
            if is_engine_dead(e) or (engine is not None and not engine_alive(engine)):
                raise EngineUnavailable(f"{job}: the engine died: {type(e).__name__}") from e
            raise LLMError(f"{job}: {type(e).__name__}: {e}") from e
        finally:
            if not started:
                coro.close()  # it never reached the engine
            gauge.dec()

    def _accounted(self, job: str, tokens: int, ticket: Ticket | None) -> AbstractContextManager[None]:
        """Admission's accounting of one engine call. A re-rank is pending work and teaches the rate. A
        background generation on the re-rank engine is pending work ahead of later re-ranks but teaches no
        rate (``Admission.running``); on an engine of its own, which runs at a lower CPU priority
        (``preference_engine_nice``), it is not counted: the re-ranks' own rate already reflects it."""
        if job == "rerank":
            return self.admission.running(tokens, ticket)
        if self.engines.get(job) is self.engines.get("rerank"):
            return self.admission.running(tokens, ticket, teaches=False)
        return nullcontext()

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens as the engine would make them (the rendered template holds its own BOS)."""
        return self.prompts.token_ids(prompt)

    async def measure_rate(self, prompt_tokens: int = 256, runs: int = 2, batch: int = 4) -> float:
        """Prompt tokens/s of the scoring engine on ``batch`` distinct prompts at once (no prefix-cache hits);
        seeds ``admission``. A batch, not one prompt: admission predicts when queued work finishes, and one
        prompt alone also measures the fixed cost of a request (measured 2026-12-03: 576 tokens/s alone
        against ~1 050 at a batch of 4, so the floor of the backoff sat at a quarter of the capacity)."""
        engine = self.engines.get("rerank") or self._engine("preference")
        label_ids = [i for _, i in self.labels[:2]]
        rate = 0.0
        for run in range(runs):
            prompts = [
                self.token_ids(
                    f"Rate probe {uuid.uuid4().hex}: " + " ".join(f"w{run}x{b}x{i}" for i in range(prompt_tokens // 3))
                )
                for b in range(batch)
            ]
            tokens = sum(len(p) for p in prompts)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.gather(
                *(ascore_labels(engine, p, label_ids, f"rate-probe-{run}-{b}") for b, p in enumerate(prompts))
            )
            rate = tokens / max(loop.time() - start, 1e-6)  # the first run may still pay one-off costs
        self.admission.seed(rate)
        return self.admission.rate

    @staticmethod
    async def _abort(engine: AsyncEngine, request_id: str) -> None:
        try:
            await engine.abort(request_id)
        except Exception as e:  # best effort: the engine may already be gone
            log.debug("abort of %s failed: %s", request_id, e)

    async def preference(self, history: list[HistoryItem], request_id: str | None = None) -> str:
        """A free-text description of the user's tastes from their history (oldest first)."""
        prompt = self.token_ids(render(self.tokenizer, preference_messages(history, self.cfg.prompt)))
        rid = _engine_request_id(request_id, "pref")
        cost = len(prompt) + self.cfg.generation.max_tokens  # decode steps counted like prompt tokens
        engine = self._engine("preference")
        coro = agenerate(engine, prompt, self.cfg.generation, rid, self.loras.get("preference"))
        texts = await self._call("preference", rid, coro, cost)
        return str(texts[0]).strip()

    def rerank_prompts(
        self,
        preference: str,
        recent: list[HistoryItem],
        candidates: list[HistoryItem],
        scoring: ScoringSpec,
        preference_chars: int | None = None,
    ) -> RerankPrompts:
        """The prompts one re-rank sends: one per candidate order (``scoring.permutations``), with their tokens
        (``llm.rerank_prompts``). ``preference_chars``: cut the preference shorter than the run's
        ``max_preference_chars`` (a stand-in)."""
        try:
            return self.prompts.build(preference, recent, candidates, scoring.permutations, preference_chars)
        except ValueError as e:  # more candidates than labels: degrade, never a 500
            raise LLMError(str(e)) from e

    def least_tokens(self, k: int, scoring: ScoringSpec) -> int:
        """A lower bound on the prompt tokens of one re-rank of ``k`` candidates: the prompts with no preference
        text ("(unknown)"), no recent items and one-letter titles, cached per ``k`` and number of orders (a real
        preference shorter than "(unknown)" could come in a token or two under it). Admission sheds on it before
        a request builds and tokenizes its own prompts: a shed answer then costs its retrieval only
        (benchmarks/shed_path.py)."""
        key = (k, scoring.permutations)
        if key not in self._least:
            try:
                self._least[key] = self.rerank_prompts("", [], [HistoryItem(title="x")] * k, scoring).total_tokens
            except LLMError:  # more candidates than labels: no bound, and rerank_prompts says why in its turn
                self._least[key] = 0
        return self._least[key]

    async def score(
        self,
        prepared: RerankPrompts,
        scoring: ScoringSpec,
        request_id: str | None = None,
        deadline: float | None = None,
        ticket: Ticket | None = None,
    ) -> np.ndarray:
        """The LLM's score of each candidate (k,), in their order: label log-probs with the run's label
        prior removed, averaged over the candidate orders (one forward pass each, run concurrently);
        ``llm.scoring`` is the same code training measured with. ``deadline`` (``time.perf_counter()``
        seconds): a prompt whose engine turn comes too late for it raises ``Late`` (``service.admission``).
        ``ticket``: the tokens admission admitted for these prompts (None: counted as they start)."""

        engine = self._engine("rerank")

        async def one(token_ids: list[int]) -> np.ndarray:
            rid = _engine_request_id(request_id, "rank")
            coro = ascore_labels(engine, token_ids, prepared.label_ids, rid, self.loras.get("rerank"))
            return np.asarray(await self._call("rerank", rid, coro, len(token_ids), deadline, ticket), dtype=np.float64)

        per_order = await asyncio.gather(*(one(ids) for ids in prepared.token_ids))
        if not all(np.isfinite(p).any() for p in per_order):
            raise LLMError("the engine returned no finite label log-probabilities")
        try:
            return item_logprobs(per_order, prepared.orders, scoring)
        except ValueError as e:  # e.g. a label prior shorter than the list: degrade, never a 500
            raise LLMError(f"scoring: {e}") from e


def _engine_request_id(request_id: str | None, job: str) -> str:
    """Unique per engine call (clients may reuse X-Request-ID) yet traceable to the HTTP request."""
    return f"{request_id or 'internal'}-{job}-{uuid.uuid4().hex[:8]}"
