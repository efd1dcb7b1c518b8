"""Preference inference (DPO4Rec step 1): each user's history -> free-text preferences -> a vector.

The prompt sees only the training part of a user's history (never the validation or test item), so
the texts can feed both the validation reward and the test metrics without a leak. Generation is one
batched vLLM call over all users; encoding uses the frozen text encoder (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llm.prompts import HistoryItem, PromptConfig, history_text, preference_messages, render
from retrieval.catalog import Catalog

log = logging.getLogger(__name__)


def history_items(catalog: Catalog, items: Sequence[int], ratings: Sequence[float] | None = None) -> list[HistoryItem]:
    """Catalog indices (time order) -> prompt items, ratings attached when known."""
    out = []
    for pos, index in enumerate(items):
        item = catalog[index]
        rating = ratings[pos] if ratings is not None else None
        out.append(
            HistoryItem(
                title=item.title,
                genres=item.genres,
                year=item.year,
                rating=None if rating is None or math.isnan(rating) else float(rating),
            )
        )
    return out


def preference_prompts(
    tokenizer, catalog: Catalog, histories: dict[str, tuple[list[int], list[float] | None]], prompt_cfg: PromptConfig
) -> dict[str, str]:
    """Rendered chat prompts per user from (items, ratings) histories."""
    return {
        user: render(tokenizer, preference_messages(history_items(catalog, items, ratings), prompt_cfg))
        for user, (items, ratings) in histories.items()
    }


def history_texts(
    catalog: Catalog, histories: dict[str, tuple[list[int], list[float] | None]], prompt_cfg: PromptConfig
) -> dict[str, str]:
    """Per user, the history lines the preference prompt would show, without any LLM (the control)."""
    return {
        user: history_text(history_items(catalog, items, ratings), prompt_cfg)
        for user, (items, ratings) in histories.items()
    }


def save_preferences(folder: Path, texts: dict[str, str], vectors: np.ndarray) -> None:
    """``preferences.jsonl`` (user order) and ``preference_vectors.npy`` (rows in that order)."""
    if vectors.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {vectors.shape[0]} vectors")
    with open(folder / "preferences.jsonl", "w", encoding="utf-8") as f:
        for user, text in texts.items():
            f.write(json.dumps({"user_id": user, "text": text}, ensure_ascii=False) + "\n")
    np.save(folder / "preference_vectors.npy", vectors.astype(np.float32))


def load_preferences(folder: Path) -> tuple[dict[str, str], np.ndarray]:
    texts: dict[str, str] = {}
    with open(folder / "preferences.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts[row["user_id"]] = row["text"]
    return texts, np.load(folder / "preference_vectors.npy")
