"""The prompts one re-rank sends: one per candidate order, rendered and tokenized, with their labels.

A re-rank of K candidates is scored from the next-token log-probabilities of K single-token labels
(``llm.labels``, LlamaRec's verbalizer), in one forward pass per candidate order: ``permutations``
cyclic shifts of the list (``llm.scoring.shifts``, permutation self-consistency), each rendered with
``llm.prompts.rerank_messages`` and the tokenizer's chat template. A preference may be cut shorter than
the run's ``max_preference_chars`` (the service cuts a miss's history stand-in).

The service (``service.language_model.LanguageModel.rerank_prompts``) and the benchmarks that replay its
prompts on a bare engine (``benchmarks.service_bench``, ``benchmarks.engine_steps``) build them here, so
the prompts a benchmark times are the ones the service sends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm.labels import Label
from llm.prompts import HistoryItem, PromptConfig, render, rerank_messages
from llm.scoring import rotate, shifts


@dataclass(frozen=True)
class RerankPrompts:
    prompts: list[str]  # one per candidate order
    orders: list[int]  # the cyclic shift of each (llm.scoring.shifts)
    label_ids: list[int]  # label token ids, position order
    token_ids: list[list[int]]  # each prompt tokenized once: admission counts them, the engine is given them

    @property
    def tokens(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


class RerankPromptBuilder:
    """Re-rank prompts with a tokenizer, the run's prompt settings and the labels prepared for it."""

    def __init__(self, tokenizer: Any, config: PromptConfig, labels: Sequence[Label]):
        self.tokenizer = tokenizer
        self.config = config
        self.labels = list(labels)  # (text, token id), at least as many as the most candidates one prompt holds

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens as the engine would make them (the rendered template holds its own BOS)."""
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def build(
        self,
        preference: str,
        recent: Sequence[HistoryItem],
        candidates: Sequence[HistoryItem],
        permutations: int = 1,
        preference_chars: int | None = None,
    ) -> RerankPrompts:
        """One prompt per candidate order (``permutations`` cyclic shifts, at most one per candidate), tokenized.
        ``preference_chars``: cut the preference shorter than the run's ``max_preference_chars``. Raises
        ``ValueError`` when there are more candidates than labels."""
        labels = self.labels[: len(candidates)]
        if len(labels) < len(candidates):
            raise ValueError(f"only {len(self.labels)} labels prepared for {len(candidates)} candidates")
        texts = [text for text, _ in labels]
        orders = shifts(len(candidates), min(permutations, len(candidates)))
        cfg = self.config
        if preference_chars is not None and preference_chars < cfg.max_preference_chars:
            cfg = dataclasses.replace(cfg, max_preference_chars=preference_chars)
        prompts = [
            render(self.tokenizer, rerank_messages(preference, recent, rotate(candidates, s), texts, cfg))
            for s in orders
        ]
        return RerankPrompts(prompts, orders, [i for _, i in labels], [self.token_ids(p) for p in prompts])
