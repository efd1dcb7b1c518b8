"""The service's view of the LLM: its two jobs on the in-process vLLM ``AsyncLLM``.

- ``preference``: history -> preference text (generation; prompt from ``llm.prompts.preference_messages``);
- ``score``: preference + recent history + lettered candidates -> one probability per candidate, read
  in ONE forward pass from the next-token log-probabilities of the labels (``llm.engine.ascore_labels``,
  LlamaRec's verbalizer).

The prompts are built by ``llm.prompts`` exactly as in training. Each call has its own vLLM request
id (``{request_id}-{job}-{random}``); a cancelled call (deadline) aborts its engine request.
Adapters from ``llm.json`` are applied per job through vLLM multi-LoRA.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm.engine import GenerationConfig, agenerate, ascore_labels, engine_alive, make_lora
from llm.labels import Label, candidate_labels
from llm.prompts import HistoryItem, PromptConfig, preference_messages, render, rerank_messages
from llm.scoring import ScoringSpec, item_logprobs, rotate, shifts
from service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


class LLMError(RuntimeError):
    """The engine could not serve a call (dead engine, rejected prompt, no log-probs)."""


@dataclass(frozen=True)
class LLMJobConfig:
    prompt: PromptConfig
    generation: GenerationConfig  # for the preference job
    rerank_k: int  # labels prepared at start: the most candidates one prompt scores
    adapters: dict[str, Path | None]  # job -> LoRA folder


class LanguageModel:
    """Preference generation and label scoring on one ``AsyncLLM`` (owned by the app's lifespan)."""

    def __init__(self, engine: AsyncLLM, tokenizer: Any, cfg: LLMJobConfig, metrics: ServiceMetrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.metrics = metrics
        self.labels: list[Label] = candidate_labels(tokenizer, cfg.rerank_k)
        self.loras: dict[str, LoRARequest | None] = {
            job: make_lora(job, path, lora_id=i + 1) if path is not None else None
            for i, (job, path) in enumerate(sorted(cfg.adapters.items()))
        }

    @property
    def alive(self) -> bool:
        return engine_alive(self.engine)

    def unfinished_requests(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    async def _call(self, job: str, request_id: str, coro: Any) -> Any:
        gauge = self.metrics.llm_in_flight.labels(job=job)
        self.metrics.llm_calls.labels(job=job).inc()
        gauge.inc()
        try:
            return await coro
        except asyncio.CancelledError:
            # the deadline passed: make sure the engine stops working on it (agenerate also aborts)
            await asyncio.shield(self._abort(request_id))
            raise
        except Exception as e:  # vLLM's errors (VLLMError, EngineDeadError, ...) share no narrower base
            raise LLMError(f"{job}: {type(e).__name__}: {e}") from e
        finally:
            gauge.dec()

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception as e:  # best effort: the engine may already be gone
            log.debug("abort of %s failed: %s", request_id, e)

    async def preference(self, history: list[HistoryItem], request_id: str | None = None) -> str:
        """A free-text description of the user's tastes from their history (oldest first)."""
        prompt = render(self.tokenizer, preference_messages(history, self.cfg.prompt))
        rid = _engine_request_id(request_id, "pref")
        texts = await self._call(
            "preference", rid, agenerate(self.engine, prompt, self.cfg.generation, rid, self.loras["preference"])
        )
        return str(texts[0]).strip()

    async def score(
        self,
        preference: str,
        recent: list[HistoryItem],
        candidates: list[HistoryItem],
        scoring: ScoringSpec,
        request_id: str | None = None,
    ) -> np.ndarray:
        """The LLM's score of each candidate (k,), in their order: label log-probs with the run's label
        prior removed, averaged over ``scoring.permutations`` candidate orders (one forward pass each,
        run concurrently); ``llm.scoring`` is the same code training measured with."""
        labels = self.labels[: len(candidates)]
        if len(labels) < len(candidates):
            raise LLMError(f"only {len(self.labels)} labels prepared for {len(candidates)} candidates")
        texts, ids = [text for text, _ in labels], [i for _, i in labels]
        orders = shifts(len(candidates), min(scoring.permutations, len(candidates)))

        async def one(shift: int) -> np.ndarray:
            messages = rerank_messages(preference, recent, rotate(candidates, shift), texts, self.cfg.prompt)
            rid = _engine_request_id(request_id, "rank")
            coro = ascore_labels(self.engine, render(self.tokenizer, messages), ids, rid, self.loras["rerank"])
            return np.asarray(await self._call("rerank", rid, coro), dtype=np.float64)

        per_order = await asyncio.gather(*(one(s) for s in orders))
        if not any(np.isfinite(p).any() for p in per_order):
            raise LLMError("the engine returned no finite label log-probabilities")
        return item_logprobs(per_order, orders, scoring)


def _engine_request_id(request_id: str | None, job: str) -> str:
    """Unique per engine call (clients may reuse X-Request-ID) yet traceable to the HTTP request."""
    return f"{request_id or 'internal'}-{job}-{uuid.uuid4().hex[:8]}"


def resolve_dtype(setting: str) -> str:
    """``auto``: bfloat16 where it is native (GPU, CPU with AVX512-BF16/AMX), else float32.

    On AVX2-only CPUs vLLM runs bf16 through slow fallbacks (measured ~3x slower than float32).
    """
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def label_probabilities(logprobs: np.ndarray) -> np.ndarray:
    """Log-probabilities over the labels -> probabilities summing to 1 (renormalised for rounding)."""
    if logprobs.size == 0 or not np.isfinite(logprobs).any():
        raise LLMError("the engine returned no finite label log-probabilities")
    shifted = np.exp(logprobs - np.max(logprobs[np.isfinite(logprobs)]))  # -inf -> 0
    return shifted / shifted.sum()
