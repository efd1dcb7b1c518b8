"""llm.engine on the real vLLM engine: generation, one-pass label scoring, the async engine, LoRA.

The sync tests share the session's ``llm_engine`` (tiny random model). The async tests start one
``AsyncLLM`` for this module (through ``async_engine``, on one event loop for all of them) with LoRA
enabled, so the adapter path is exercised by the same engine start.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from llm.engine import (
    EngineConfig,
    GenerationConfig,
    agenerate,
    ascore_labels,
    async_engine,
    engine_alive,
    generate,
    make_lora,
    score_labels,
)
from llm.labels import candidate_labels
from llm.prompts import HistoryItem, PromptConfig, preference_messages, render, rerank_messages

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.v1.engine.async_llm import AsyncLLM

HISTORY = [
    HistoryItem("Toy Story (1995)", ("Animation", "Children's", "Comedy"), 1995, 5.0),
    HistoryItem("Heat (1995)", ("Action", "Crime", "Thriller"), 1995, 4.0),
    HistoryItem("Fargo (1996)", ("Crime", "Drama", "Thriller"), 1996, 5.0),
    HistoryItem("Babe (1995)", ("Children's", "Comedy", "Drama"), 1995, 3.0),
]


def rerank_prompt(tokenizer: Any, k: int, preference: str = "Likes crime thrillers.") -> tuple[str, list[int]]:
    labels = candidate_labels(tokenizer, k)
    candidates = [HistoryItem(f"Movie number {i}", ("Drama",), 1980 + i) for i in range(k)]
    messages = rerank_messages(preference, HISTORY, candidates, [t for t, _ in labels], PromptConfig())
    return render(tokenizer, messages), [i for _, i in labels]


def test_generate_returns_n_texts_per_prompt(llm_engine: LLM, smollm2_tokenizer: Any) -> None:
    prompts = [render(smollm2_tokenizer, preference_messages(HISTORY[:n], PromptConfig())) for n in (1, 3)]
    texts = generate(llm_engine, prompts, GenerationConfig(n=3, temperature=1.0, max_tokens=8, seed=1), progress=False)
    assert len(texts) == 2 and all(len(t) == 3 for t in texts)
    assert all(isinstance(s, str) and s for t in texts for s in t)
    greedy = GenerationConfig(max_tokens=8)
    assert generate(llm_engine, prompts, greedy, progress=False) == generate(
        llm_engine, prompts, greedy, progress=False
    )


def test_score_labels_is_a_distribution_over_exactly_the_labels(llm_engine: LLM, smollm2_tokenizer: Any) -> None:
    (p20, ids20), (p5, ids5) = rerank_prompt(smollm2_tokenizer, 20), rerank_prompt(smollm2_tokenizer, 5)
    scores = score_labels(llm_engine, [p20, p5], [ids20, ids5])
    assert [s.shape for s in scores] == [(20,), (5,)]
    for s in scores:
        assert np.isfinite(s).all()
        assert np.exp(s).sum() == pytest.approx(1.0, abs=1e-3)  # processed log-probs: after the mask
    # Values follow the order of the ids asked for.
    permuted = score_labels(llm_engine, [p20], [ids20[::-1]])[0]
    np.testing.assert_allclose(permuted, scores[0][::-1], atol=1e-5)


def test_score_labels_matches_a_transformers_forward_pass(
    llm_engine: LLM, smollm2_tokenizer: Any, tiny_llm_dir: Path
) -> None:
    # Same model in transformers: checks the prompt is tokenized as rendered (no extra BOS) and the
    # next-token position is the one scored.
    import torch
    from transformers import AutoModelForCausalLM

    prompt, ids = rerank_prompt(smollm2_tokenizer, 20)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    input_ids = torch.tensor([smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids).logits[0, -1, ids]  # (k,)
    expected = torch.log_softmax(logits, dim=-1).numpy()
    got = score_labels(llm_engine, [prompt], [ids])[0]
    np.testing.assert_allclose(got, expected, atol=0.02)  # bf16 engine vs fp32 reference
    assert np.argsort(-got)[:3].tolist() == np.argsort(-expected)[:3].tolist()


def test_score_labels_rejects_bad_label_ids(llm_engine: LLM) -> None:
    with pytest.raises(ValueError, match="distinct"):
        score_labels(llm_engine, ["x"], [[5, 5]])
    with pytest.raises(ValueError, match="prompts"):
        score_labels(llm_engine, ["x", "y"], [[5]])


# ---- the async engine (service shape) -------------------------------------------------------------


@dataclasses.dataclass
class AsyncHarness:
    engine: AsyncLLM
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def async_tiny(tiny_engine_config: EngineConfig) -> Iterator[AsyncHarness]:
    # One event loop for the module: AsyncLLM binds its output handler to the loop of its first request.
    config = dataclasses.replace(tiny_engine_config, enable_lora=True, max_lora_rank=8, max_loras=1)
    loop = asyncio.new_event_loop()
    context = async_engine(config)
    engine = loop.run_until_complete(context.__aenter__())
    harness = AsyncHarness(engine, loop)
    try:
        yield harness
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        assert not engine_alive(engine)  # shut down for good
        loop.close()


@pytest.mark.engine
def test_async_scoring_equals_sync_scoring(async_tiny: AsyncHarness, llm_engine: LLM, smollm2_tokenizer: Any) -> None:
    assert engine_alive(async_tiny.engine)
    prompt, ids = rerank_prompt(smollm2_tokenizer, 20)
    sync = score_labels(llm_engine, [prompt], [ids])[0]
    alone = async_tiny.run(ascore_labels(async_tiny.engine, prompt, ids, request_id="one"))
    np.testing.assert_allclose(alone, sync, atol=1e-3)

    async def concurrent() -> list[np.ndarray]:
        return await asyncio.gather(*(ascore_labels(async_tiny.engine, prompt, ids) for _ in range(4)))

    for scores in async_tiny.run(concurrent()):
        np.testing.assert_allclose(scores, sync, atol=1e-3)


@pytest.mark.engine
def test_async_generate_returns_n_texts(async_tiny: AsyncHarness, smollm2_tokenizer: Any) -> None:
    prompt = render(smollm2_tokenizer, preference_messages(HISTORY, PromptConfig()))
    gen = GenerationConfig(n=3, temperature=1.0, max_tokens=8, seed=3)
    texts = async_tiny.run(agenerate(async_tiny.engine, prompt, gen))
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert async_tiny.run(agenerate(async_tiny.engine, prompt, gen)) == texts  # seeded


@pytest.mark.engine
def test_cancelled_request_leaves_the_engine_healthy(async_tiny: AsyncHarness, smollm2_tokenizer: Any) -> None:
    prompt = render(smollm2_tokenizer, preference_messages(HISTORY, PromptConfig()))

    async def cancel_midway() -> list[str]:
        task = asyncio.ensure_future(agenerate(async_tiny.engine, prompt, GenerationConfig(max_tokens=500)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await agenerate(async_tiny.engine, prompt, GenerationConfig(max_tokens=4))

    assert len(async_tiny.run(cancel_midway())) == 1
    assert engine_alive(async_tiny.engine)
    assert async_tiny.engine.get_num_unfinished_requests() == 0


@pytest.mark.engine
def test_lora_adapter_changes_the_scores(async_tiny: AsyncHarness, tiny_lora_dir: Path, smollm2_tokenizer: Any) -> None:
    prompt, ids = rerank_prompt(smollm2_tokenizer, 10)
    lora = make_lora("tiny-rerank", tiny_lora_dir, lora_id=1)
    base = async_tiny.run(ascore_labels(async_tiny.engine, prompt, ids))
    adapted = async_tiny.run(ascore_labels(async_tiny.engine, prompt, ids, lora=lora))
    assert np.isfinite(adapted).all() and np.exp(adapted).sum() == pytest.approx(1.0, abs=1e-3)
    assert np.abs(adapted - base).max() > 1e-3
    again = async_tiny.run(ascore_labels(async_tiny.engine, prompt, ids))
    np.testing.assert_allclose(again, base, atol=1e-5)  # the adapter applies per request only
