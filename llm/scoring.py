"""From label log-probabilities to a candidate's served score: de-biasing, candidate orders, fusion.

One module both sides call, so the service scores exactly the way training measured:

- **Label prior removal** (PriDe, Zheng et al., arXiv 2309.03882). A small LLM prefers some labels
  whatever they name (SmolLM2 zero-shot answered "A" in 89 % of prompts, docs/RESULTS.md). PriDe
  estimates that prior over label *positions* from a calibration sample, each list scored under
  cyclic shifts of its candidates: the content then visits every position, so what stays attached
  to a position is the prior. Per list, ``prior ∝ exp(mean over shifts of log P(label))``; the
  estimate is the mean of those over the lists. At scoring, ``log P(label) - log prior(label)``,
  renormalised over the labels.
- **Candidate orders** (permutation self-consistency, Tang et al., arXiv 2310.07712, as an option):
  the same list scored under ``permutations`` cyclic shifts and each item's log-probability averaged,
  which also cancels position effects, at ``permutations`` times the prompt cost.
- **Fusion with the retriever**: ``z(retriever score) + weight * z(LLM log-prob)`` over the K
  candidates (z: mean 0, standard deviation 1 over the list, so the weight does not depend on either
  score's scale). The weight is chosen on validation users (``training.rerank_training``); 0 means the
  LLM does not help and the service skips it; ``None`` (runs saved before fusion) orders by the LLM alone.
- **Slices** (SPEC section 10): a weight per kind of request, chosen on that slice's validation data
  (``training.cold_start``): ``warm`` users, lists holding ``new_items`` (``new_items_shelf``: only new
  ones), ``new_users_{k}`` with at most k items. The service classifies each request and calls the
  engine only where its slice's weight is above 0; a slice without a weight of its own takes ``weight``.
- **Served probabilities**: the fused scores of the K candidates through a softmax (``label_probabilities``):
  the ``relevance_score`` of the re-ranked head (``service.ranking``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class ScoringSpec:
    """How label log-probs become served scores; saved in ``llm.json`` ("scoring") by the run that chose it."""

    weight: float | None = None  # fusion weight of the LLM; 0 = retriever only (no engine call); None = LLM only
    log_prior: tuple[float, ...] | None = None  # PriDe log prior over label positions A, B, ...; None = raw
    permutations: int = 1  # candidate orders averaged per list (cyclic shifts); 1 = the incoming order only
    slice_weights: dict[str, float] | None = field(default=None, hash=False)  # slice -> weight (see above)

    def __post_init__(self) -> None:
        weights = [self.weight, *(self.slice_weights or {}).values()]
        for w in weights:
            if w is not None and (not np.isfinite(w) or w < 0):
                raise ValueError(f"scoring weights must be finite numbers >= 0 or null, got {w}")
        if self.permutations < 1:
            raise ValueError(f"scoring.permutations must be >= 1, got {self.permutations}")
        if self.log_prior is not None:
            object.__setattr__(self, "log_prior", tuple(float(x) for x in self.log_prior))  # lists from JSON

    @property
    def uses_llm(self) -> bool:
        """False when the fused score is the retriever's alone on every slice: the engine need not be called."""
        weights = [self.weight, *(self.slice_weights or {}).values()]
        return any(w is None or w > 0 for w in weights)

    def for_slice(self, name: str) -> ScoringSpec:
        """The scoring of one slice: its own weight when it has one, else ``weight``; no slices below it."""
        weights = self.slice_weights or {}
        return replace(self, weight=weights.get(name, self.weight), slice_weights=None)


def shifts(k: int, n: int) -> list[int]:
    """``n`` cyclic shifts of a k-list, evenly spaced (0 first): the candidate orders scored."""
    if not 1 <= n <= k:
        raise ValueError(f"need 1 <= orders <= k, got {n} orders of {k} candidates")
    return sorted({round(j * k / n) % k for j in range(n)})


def rotate(items: Sequence[T], shift: int) -> list[T]:
    """Candidates in shifted order: position p shows ``items[(p + shift) % k]``."""
    k = len(items)
    return [items[(p + shift) % k] for p in range(k)]


def _finite(logprobs: np.ndarray) -> np.ndarray:
    """-inf (a label the engine did not return) -> just below the lowest finite value."""
    x = np.asarray(logprobs, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError("no finite label log-probability")
    return np.where(finite, x, x[finite].min() - 10.0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def estimate_prior(shifted: Sequence[np.ndarray]) -> np.ndarray:
    """PriDe's log prior over label positions from calibration lists.

    ``shifted[n]``: (S, K) label log-probs of list n scored under S cyclic shifts (rows: shifts;
    columns: label positions). Returns a (K,) log-distribution.
    """
    if not shifted:
        raise ValueError("estimate_prior needs at least one calibration list")
    priors = []
    for block in shifted:
        b = np.asarray(block, dtype=np.float64)
        if b.ndim != 2:
            raise ValueError(f"each calibration block must be (shifts, K), got shape {b.shape}")
        per_label = np.apply_along_axis(_finite, 1, b).mean(axis=0)  # (K,) mean log-prob per position
        priors.append(np.exp(log_softmax(per_label)))
    return np.log(np.mean(priors, axis=0))


def debias(logprobs: np.ndarray, log_prior: Sequence[float] | None) -> np.ndarray:
    """Label log-probs (K,) with the position prior removed, renormalised; unchanged (bar -inf) without one."""
    x = _finite(logprobs)
    if log_prior is None:
        return log_softmax(x)
    prior = np.asarray(log_prior, dtype=np.float64)
    if len(prior) < len(x):
        raise ValueError(f"the label prior covers {len(prior)} positions, the list has {len(x)}")
    return log_softmax(x - log_softmax(prior[: len(x)]))


def item_logprobs(per_order: Sequence[np.ndarray], order_shifts: Sequence[int], spec: ScoringSpec) -> np.ndarray:
    """Per-candidate LLM scores (K,), in the incoming candidate order, from the lists scored under
    ``order_shifts`` (``per_order[j][p]``: label p of the list rotated by ``order_shifts[j]``):
    de-biased, mapped back to the items, averaged over the orders."""
    if len(per_order) != len(order_shifts) or not per_order:
        raise ValueError(f"got {len(per_order)} scored orders for {len(order_shifts)} shifts")
    k = len(per_order[0])
    total = np.zeros(k)
    for logprobs, shift in zip(per_order, order_shifts, strict=True):
        d = debias(logprobs, spec.log_prior)  # by label position
        total[(np.arange(k) + shift) % k] += d  # position p showed item (p + shift) % k
    return total / len(per_order)


def zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return np.zeros_like(x) if sd == 0 or not np.isfinite(sd) else (x - x.mean()) / sd


def fused_scores(retriever: np.ndarray | None, llm: np.ndarray, weight: float | None) -> np.ndarray:
    """The served score of each of K candidates (higher is better); see the module text."""
    if weight is None:
        return np.asarray(llm, dtype=np.float64)
    if retriever is None:
        raise ValueError("a fused score needs the retriever's scores of the candidates")
    r = np.asarray(retriever, dtype=np.float64)
    if r.shape != np.shape(llm):
        raise ValueError(f"retriever scores {r.shape} and LLM scores {np.shape(llm)} differ in shape")
    return zscore(r) + weight * zscore(llm)


def label_probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores over the K labels (log-probabilities, or fused scores) -> probabilities summing to 1 (a softmax,
    renormalised for rounding; -inf -> 0). Raises ``ValueError`` when no score is finite."""
    if scores.size == 0 or not np.isfinite(scores).any():
        raise ValueError("no finite label score")
    shifted = np.exp(scores - np.max(scores[np.isfinite(scores)]))  # -inf -> 0
    return shifted / shifted.sum()


def order(scores: np.ndarray) -> np.ndarray:
    """Positions best first; ties (and NaN, last) keep the incoming order."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-np.where(np.isnan(s), -np.inf, s), kind="stable")
