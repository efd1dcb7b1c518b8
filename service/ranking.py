"""The final order and ``relevance_score`` of a response, from the candidate order and the LLM's label scores.

Candidates arrive in an order: the retriever's (inner product, best first) or the caller's. The LLM
re-ranks the first K of them; the rest keep their order below. Scores, all in [0, 1] and
non-increasing down the results:

- re-ranked items: the label probability ``p_i`` (a distribution over the K labels; sums to 1), sorted
  by it, ties keeping the incoming order;
- items below position K: rank-derived, squashed under the lowest re-ranked probability ``p_min``:
  ``p_min * (n - j) / (n - K + 1)`` at incoming position j (K <= j < n), so they stay strictly below
  every re-ranked item (when ``p_min > 0``) and keep their order;
- no LLM scores (weight 0, shed, timed out, failed) and the retriever's scores known: those scores (its
  inner products, the new items' through their content vectors), the order they sort into;
- no LLM scores and no retriever scores (a run scored by the LLM alone, given candidates): rank-derived over
  the caller's order, ``(n - j) / n``.

The probabilities carry the LLM's confidence; the tail's rank-derived scores keep it below the head, where
the retriever's unbounded inner products could not.
"""

from __future__ import annotations

import numpy as np


def rank_scores(n: int, top: float = 1.0, offset: int = 0) -> list[float]:
    """``top * (n - j) / (n - offset + 1)`` for j in offset..n-1 (``offset=0`` uses ``n``)."""
    span = n - offset + (1 if offset else 0)
    return [top * (n - j) / span for j in range(offset, n)]


def final_order(
    n: int, probabilities: np.ndarray | None, retriever: np.ndarray | None = None
) -> tuple[list[int], list[float]]:
    """Positions into the incoming candidate list (sorted by ``retriever`` when given), best first, and their
    relevance scores."""
    if n == 0:
        return [], []
    if probabilities is None or len(probabilities) == 0:
        if retriever is not None and len(retriever) == n:
            return list(range(n)), [float(x) for x in retriever]
        return list(range(n)), rank_scores(n)
    k = len(probabilities)
    if k > n:
        raise ValueError(f"{k} probabilities for {n} candidates")
    head = sorted(range(k), key=lambda j: (-float(probabilities[j]), j))  # stable on ties
    head_scores = [float(probabilities[j]) for j in head]
    floor = min(head_scores)
    return head + list(range(k, n)), head_scores + rank_scores(n, top=floor, offset=k)
