"""Single-token candidate labels (A, B, C, ...) for the re-rank verbalizer.

After LlamaRec (Yue et al., arXiv 2311.02089): each candidate gets a label that is exactly ONE token
where the assistant's answer begins, so the next-token log-probabilities of the labels, read in one
forward pass, score every candidate. Whether a string is one token depends on the tokenizer and on
the text before it (BPE merges across the boundary), so every label is checked by tokenizing
``prompt + label`` against ``prompt``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from llm.prompts import render

# Tried in this order: capitals first (the prompts say "A to T"), then lower case, then digits.
LABEL_POOL: tuple[str, ...] = tuple(string.ascii_uppercase + string.ascii_lowercase + string.digits)

Label = tuple[str, int]  # (text, token id)


def candidate_labels(tokenizer: Any, k: int, prompt: str | None = None) -> list[Label]:
    """``k`` distinct labels, each exactly one token right after ``prompt``.

    ``prompt`` defaults to a probe rendered with the tokenizer's chat template, ending where the
    assistant's answer begins (as every re-rank prompt does). Raises ``ValueError`` if the
    tokenizer cannot provide ``k`` such labels.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probe = _probe_prompt(tokenizer) if prompt is None else prompt
    base = _encode(tokenizer, probe)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    labels: list[Label] = []
    seen: set[int] = set()
    for text in LABEL_POOL:
        token_id = _single_token(tokenizer, probe, base, text)
        if token_id is None or token_id in seen or token_id in special:
            continue
        labels.append((text, token_id))
        seen.add(token_id)
        if len(labels) == k:
            return labels
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} provides only {len(labels)} single-token "
        f"labels after the prompt, fewer than the k={k} candidates asked for; re-rank fewer candidates"
    )


def parse_label(output: int | str, labels: Sequence[Label]) -> int | None:
    """Candidate position for a generated token id or text (``"B"``, ``" B."``, ``"B) Title"``).

    Returns ``None`` when the output is not one of the labels.
    """
    if isinstance(output, int):
        for position, (_, token_id) in enumerate(labels):
            if token_id == output:
                return position
        return None
    text = output.strip()
    positions = {label: position for position, (label, _) in enumerate(labels)}
    if text in positions:
        return positions[text]
    # A label followed by punctuation or a space: "B." "B)" "B: Title".
    head = text[:1]
    if head in positions and (len(text) == 1 or not text[1].isalnum()):
        return positions[head]
    return None


def _probe_prompt(tokenizer: Any) -> str:
    messages = [
        {"role": "system", "content": "Answer with the label of one candidate."},
        {"role": "user", "content": "Candidates:\nA. first\nB. second\n\nWhich one?"},
    ]
    return render(tokenizer, messages, add_generation_prompt=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # As the engine sends prompts: the chat template already holds any BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token(tokenizer: Any, prompt: str, base: list[int], label: str) -> int | None:
    ids = _encode(tokenizer, prompt + label)
    if len(ids) != len(base) + 1 or ids[: len(base)] != base:
        return None  # the label merged with the prompt's end, or is more than one token
    token_id = ids[-1]
    if tokenizer.decode([token_id]).strip() != label:
        return None
    return int(token_id)
