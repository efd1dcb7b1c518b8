"""llm.labels: single-token labels right after the re-rank prompt, and parsing them back."""

from __future__ import annotations

import string
from typing import Any

import pytest

from llm.labels import candidate_labels, parse_label
from llm.prompts import HistoryItem, PromptConfig, render, rerank_messages


def rerank_prompt(tokenizer: Any, labels: list[str]) -> str:
    candidates = [HistoryItem(f"Movie {i}", ("Drama",), 1990) for i in range(len(labels))]
    history = [HistoryItem("Heat", ("Action",), 1995, 4.0)]
    return render(tokenizer, rerank_messages("Likes thrillers.", history, candidates, labels, PromptConfig()))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("k", [20, 40])
def test_every_label_is_one_token_after_a_real_rerank_prompt(smollm2_tokenizer: Any, k: int) -> None:
    labels = candidate_labels(smollm2_tokenizer, k)
    texts = [text for text, _ in labels]
    assert len(labels) == k and len(set(texts)) == k and len({i for _, i in labels}) == k
    assert texts[: min(k, 26)] == list(string.ascii_uppercase[:k])
    prompt = rerank_prompt(smollm2_tokenizer, texts)
    base = encode(smollm2_tokenizer, prompt)
    for text, token_id in labels:
        assert encode(smollm2_tokenizer, prompt + text) == [*base, token_id], text


def test_parse_label_round_trips(smollm2_tokenizer: Any) -> None:
    labels = candidate_labels(smollm2_tokenizer, 40)
    for position, (text, token_id) in enumerate(labels):
        assert parse_label(token_id, labels) == position
        assert parse_label(text, labels) == position
        assert parse_label(f" {text}. {text}{text}", labels) == position
    assert parse_label("Banana", labels) is None  # a word, not the label B
    assert parse_label("", labels) is None
    assert parse_label(-1, labels) is None


def test_asking_for_more_labels_than_the_tokenizer_has_is_a_clear_error(smollm2_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="single-token labels"):
        candidate_labels(smollm2_tokenizer, 500)
    with pytest.raises(ValueError, match="k must be"):
        candidate_labels(smollm2_tokenizer, 0)


def test_a_label_that_merges_with_the_prompt_is_skipped(smollm2_tokenizer: Any) -> None:
    # After "Answer: I" the letters may merge into words (e.g. "In"); whatever is kept must be one
    # token in that context.
    prompt = "Answer: I"
    base = encode(smollm2_tokenizer, prompt)
    for text, token_id in candidate_labels(smollm2_tokenizer, 20, prompt=prompt):
        assert encode(smollm2_tokenizer, prompt + text) == [*base, token_id]
