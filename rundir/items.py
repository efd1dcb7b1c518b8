"""A catalog item as the LLM's prompts show it: the one conversion training and serving both call."""

from __future__ import annotations

import math
from collections.abc import Sequence

from llm.prompts import HistoryItem
from retrieval.catalog import Catalog, Item


def prompt_item(item: Item, rating: float | None = None) -> HistoryItem:
    """One catalog item -> a prompt item (title, genres, year; a rating when known and not NaN)."""
    known = None if rating is None or math.isnan(rating) else float(rating)
    return HistoryItem(title=item.title, genres=item.genres, year=item.year, rating=known)


def prompt_items(catalog: Catalog, indices: Sequence[int], ratings: Sequence[float] | None = None) -> list[HistoryItem]:
    """Catalog indices (time order) -> prompt items, ratings attached when known."""
    return [prompt_item(catalog[i], ratings[pos] if ratings is not None else None) for pos, i in enumerate(indices)]
