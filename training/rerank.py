"""The re-rank job's training side: candidate lists, SFT targets, DPO pairs, and a transformers scorer.

The re-rank job is LlamaRec's verbalizer (Yue et al., arXiv 2311.02089): K candidates are listed under
single-token labels (``llm.labels``), and the next-token log-probabilities of the labels, read in one
forward pass, score them all.

**Training lists** are built the way LlamaRec and S-DPO build theirs (docs/DECISIONS.md says what was
taken and changed): from every training user and several positions of each history (the prefix before
position t -> item t, a training item, so the validation and test items stay clean judges), each list
the target plus K-1 negatives drawn from a mix (the retriever's highest-ranked wrong items for that
prefix, popularity-sampled, uniform; never an item of the prefix, nor the user's validation or test
item), **shuffled** with a seeded generator, so the target's label is uniform over A..K and position
carries no signal. DPO pairs: chosen = the target's label, rejected = labels drawn at random from the
list's wrong candidates (S-DPO draws 3), never always the same position. Lists of the **cold kind**
(``training_lists(cut=...)``, ``rerank.cold_lists``) are built the same way with what a cold request shows: the
newest few items and their history text as the preference, and K-1 uniform negatives (candidates the
retriever cannot tell apart).

**Evaluation lists** (validation, test, the cold slice) are the retriever's top K in its order with its
scores, as the service shows them; a target the retriever missed is not inserted (it scores 0).

:class:`ScoringPrompts` renders lists under their orders into the prompts of one label-scoring engine job.

:func:`hf_label_logprobs` scores prompts with a transformers model exactly as ``llm.engine.score_labels``
does with vLLM (log-softmax over the label tokens only), so training-side evaluation and serving agree.
Measured against vLLM (bf16 engine, 20 labels, 6 re-rank prompts): the tiny test model agrees to 0.0015
(max abs log-prob); the real SmolLM2-135M to 0.19 max / 0.04 mean with transformers in float32 (0.23 /
0.06 in bf16), the argmax always the same. The gap is bf16 arithmetic in vLLM over 30 layers, not a
different formula; compare in float32 on both sides when exact agreement matters.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm.labels import Label
from llm.prompts import HistoryItem, PromptConfig, history_text, natural_title, render, rerank_messages
from llm.scoring import order, rotate
from retrieval.catalog import Catalog
from retrieval.sasrec import SASRec
from rundir.items import prompt_items
from training.retriever import score_users

Message = dict[str, str]


@dataclass
class RerankExample:
    user_id: str
    candidates: list[int]  # item indices in the order shown
    labels: list[Label]  # (text, token id) per candidate position
    messages: list[Message]  # llm.prompts.rerank_messages; render() them for vLLM
    target: int  # the true next item
    target_position: int | None  # its position in candidates; None if the retriever missed it (evaluation)
    retriever_scores: list[float] | None = None  # the retriever's score of each shown candidate (evaluation)
    preference: str = ""  # what the prompt shows: the preference text, the recent history, the candidates
    recent: list[HistoryItem] = field(default_factory=list)
    items: list[HistoryItem] = field(default_factory=list)

    def shifted_messages(self, shift: int, prompt_cfg: PromptConfig) -> list[Message]:
        """The prompt with the candidates in cyclic order ``shift`` (llm.scoring.rotate), same labels."""
        if shift == 0:
            return self.messages
        texts = [text for text, _ in self.labels]
        return rerank_messages(self.preference, self.recent, rotate(self.items, shift), texts, prompt_cfg)

    @property
    def target_label(self) -> str | None:
        return None if self.target_position is None else self.labels[self.target_position][0]

    def wrong_positions(self) -> list[int]:
        return [i for i, item in enumerate(self.candidates) if item != self.target]


def _rng(seed: int, user: str, position: int = 0) -> np.random.Generator:
    # crc32, unlike hash(), is stable across processes: the same split gives the same lists on every run
    return np.random.default_rng([seed, zlib.crc32(user.encode("utf-8")), position])


def retrieve(
    model: SASRec,
    seqs: Mapping[str, Sequence[int]],
    prefs: Mapping[str, np.ndarray] | None,
    users: Sequence[str],
    k: int,
    batch_size: int = 512,
    banned: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[list[int], list[float]]]:
    """The retriever's top-``k`` (items, scores) per key, best first; items of ``seqs[u]`` and
    ``banned[u]`` excluded. Ties are broken by the lower item index, so the lists are deterministic."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for start in range(0, len(users), batch_size):
        chunk = list(users[start : start + batch_size])
        scores = score_users(model, seqs, prefs, chunk, batch_size).astype(np.float64)  # (b, N+1)
        scores[:, 0] = -np.inf
        for row, user in enumerate(chunk):
            seen = np.asarray([*seqs[user], *(banned[user] if banned else ())], dtype=np.int64)
            scores[row, seen] = -np.inf
            top = np.argsort(-scores[row], kind="stable")[:k]
            out[user] = ([int(i) for i in top], [float(scores[row, i]) for i in top])
    return out


# ---- training lists -----------------------------------------------------------------------------------


def negative_counts(k: int, hard: float, popular: float, uniform: float) -> tuple[int, int, int]:
    """K-1 negatives split by the mix's weights (largest remainders), e.g. K=10, (0.5, 0.25, 0.25) -> 5, 2, 2."""
    weights = np.array([hard, popular, uniform], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"negative mix weights must be >= 0 and not all 0, got {weights.tolist()}")
    share = weights / weights.sum() * (k - 1)
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: k - 1 - counts.sum()]:
        counts[i] += 1
    return int(counts[0]), int(counts[1]), int(counts[2])


def draw_list(
    target: int,
    excluded: set[int],
    ranked: Sequence[int],
    popularity: np.ndarray,
    counts: tuple[int, int, int],
    rng: np.random.Generator,
) -> list[int]:
    """The target and K-1 negatives, shuffled. ``excluded``: items never drawn (the prefix, the user's
    validation and test items); ``ranked``: the retriever's items for the prefix, best first;
    ``popularity``: (N+1,) training interaction counts (index 0 = padding, never drawn)."""
    n_hard, n_pop, n_uni = counts
    taken = {0, int(target), *excluded}
    negatives = [int(i) for i in ranked if int(i) not in taken][:n_hard]
    taken.update(negatives)
    allowed = np.ones(len(popularity), dtype=bool)
    allowed[list(taken)] = False
    for n, weights in ((n_pop, popularity.astype(np.float64)), (n_uni + n_hard - len(negatives), None)):
        pool = np.flatnonzero(allowed)
        if n == 0:
            continue
        if len(pool) < n:
            raise ValueError(f"the catalog has {len(pool)} items left to draw {n} negatives from")
        p = None
        if weights is not None:
            w = weights[pool] + 1.0  # add-one: items never interacted with stay possible
            p = w / w.sum()
        picked = rng.choice(pool, size=n, replace=False, p=p)
        negatives.extend(int(i) for i in picked)
        allowed[picked] = False
    shown = [int(target), *negatives]
    return [shown[i] for i in rng.permutation(len(shown))]


_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def names_item(text: str, title: str) -> bool:
    """Does the preference text name this title (catalogue or reading order, year dropped)?"""
    low = text.lower()
    bare = _YEAR.sub("", title).strip().lower()
    return any(t and t in low for t in {bare, _YEAR.sub("", natural_title(title)).strip().lower()})


def list_positions(catalog: Catalog, train: Sequence[int], preference: str, per_user: int) -> list[int]:
    """The history positions t (target ``train[t]``, prompt history ``train[:t]``) a user's training
    lists predict: the newest ``per_user`` with a non-empty prefix whose target the preference text does
    not name (the text is written from the newest training items: a list whose answer it names would
    teach "pick what the text names", useless when the next item is never one the text names)."""
    out = []
    for t in range(len(train) - 1, 0, -1):
        if len(out) == per_user:
            break
        if not names_item(preference, catalog[train[t]].title):
            out.append(t)
    return sorted(out)


def draw_positions(pool: Sequence[tuple[str, int]], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` positions of ``pool`` drawn without replacement (seeded), kept in pool order; all when fewer."""
    return [pool[i] for i in sorted(np.random.default_rng(seed).permutation(len(pool))[:n])]


def training_lists(
    catalog: Catalog,
    positions: Sequence[tuple[str, int]],
    train: Mapping[str, Sequence[int]],
    banned: Mapping[str, Sequence[int]],
    ranked: Mapping[str, Sequence[int]],
    popularity: np.ndarray,
    preferences: Mapping[str, str],
    labels: Sequence[Label],
    prompt_cfg: PromptConfig,
    counts: tuple[int, int, int],
    seed: int,
    cut: int = 0,
    stand_in: bool = False,
) -> list[RerankExample]:
    """One shuffled list per (user, t) in ``positions``; ``ranked[f"{user}@{t}"]``: the retriever's
    items for that prefix, best first; ``banned[user]``: the validation and test items.

    ``cut`` > 0 makes lists of the cold kind: the prompt shows only the newest ``cut`` items of the prefix and,
    as the preference, their history text (``stand_in_text``; ``preferences`` unused). Negatives still avoid
    the whole prefix. ``stand_in`` gives every list that preference (the whole prefix's history text, as a
    cache miss serves it) without the cut."""
    out = []
    for user, t in positions:
        prefix, target = list(train[user][:t]), int(train[user][t])
        rng = _rng(seed, user, t)
        shown = draw_list(target, {*prefix, *banned[user]}, ranked[f"{user}@{t}"], popularity, counts, rng)
        history = prefix[-cut:] if cut else prefix
        preference = stand_in_text(catalog, history, prompt_cfg) if cut or stand_in else preferences.get(user, "")
        out.append(_example(catalog, user, history, shown, target, preference, labels, prompt_cfg))
    return out


def stand_in_text(catalog: Catalog, history: Sequence[int], prompt_cfg: PromptConfig) -> str:
    """The history's text (``llm.prompts.history_text``): the preference the service sends on a cache miss,
    and the cold slice's and cold training lists' preference."""
    return history_text(prompt_items(catalog, history), prompt_cfg)


def _example(
    catalog: Catalog,
    user: str,
    history: Sequence[int],
    shown: list[int],
    target: int,
    preference: str,
    labels: Sequence[Label],
    prompt_cfg: PromptConfig,
    retriever_scores: list[float] | None = None,
) -> RerankExample:
    """The list ``shown`` as a prompt: the preference, the newest ``max_recent`` of ``history``, the labels."""
    items = prompt_items(catalog, shown)
    recent = prompt_items(catalog, history)[-prompt_cfg.max_recent :] if prompt_cfg.max_recent else []
    return RerankExample(
        user_id=user,
        candidates=shown,
        labels=list(labels),
        messages=rerank_messages(preference, recent, items, [text for text, _ in labels], prompt_cfg),
        target=target,
        target_position=shown.index(target) if target in shown else None,
        retriever_scores=retriever_scores,
        preference=preference,
        recent=recent,
        items=items,
    )


def evaluation_examples(
    catalog: Catalog,
    users: Sequence[str],
    histories: Mapping[str, Sequence[int]],
    targets: Mapping[str, int],
    retrieved: Mapping[str, tuple[list[int], list[float]]],
    preferences: Mapping[str, str],
    labels: Sequence[Label],
    prompt_cfg: PromptConfig,
) -> list[RerankExample]:
    """One list per user: the retriever's top K (``retrieved[u]``, best first, with scores) in its order.

    histories[u]: what the prompt may show; targets[u]: the true next item (its position None when the
    retriever missed it); preferences[u]: the preference text ('' if none).
    """
    k = len(labels)
    examples = []
    for user in users:
        items_k, scores_k = retrieved[user]
        if len(items_k) < k:
            raise ValueError(f"user {user!r}: the retriever gave {len(items_k)} candidates, fewer than k={k}")
        shown, scores = [int(i) for i in items_k[:k]], [float(s) for s in scores_k[:k]]
        preference = preferences.get(user, "")
        examples.append(
            _example(catalog, user, histories[user], shown, int(targets[user]), preference, labels, prompt_cfg, scores)
        )
    return examples


def sft_rows(examples: Sequence[RerankExample]) -> list[dict[str, Any]]:
    """{prompt, completion} rows for ``training.dpo.train_sft``: the true item's label."""
    return [
        {"user_id": e.user_id, "prompt": e.messages, "completion": e.target_label}
        for e in examples
        if e.target_label is not None
    ]


def dpo_rows(examples: Sequence[RerankExample], rejected: int, seed: int) -> list[dict[str, Any]]:
    """{prompt, chosen, rejected} rows for ``training.dpo.train_dpo``: the true label against ``rejected``
    labels drawn at random from the list's wrong candidates (S-DPO draws 3), one row each."""
    rows = []
    for n, e in enumerate(examples):
        if e.target_label is None:
            continue
        wrong = e.wrong_positions()
        picked = _rng(seed, e.user_id, n).choice(wrong, size=min(rejected, len(wrong)), replace=False)
        rows += [
            {"user_id": e.user_id, "prompt": e.messages, "chosen": e.target_label, "rejected": e.labels[int(p)][0]}
            for p in picked
        ]
    return rows


# ---- scoring --------------------------------------------------------------------------------------------


class ScoringPrompts:
    """The prompts of one label-scoring engine job, and where each list's orders landed in them (the re-rank
    stage and the cold-start protocol build theirs here)."""

    def __init__(self, tokenizer: Any, prompt_cfg: PromptConfig) -> None:
        self.tokenizer, self.prompt_cfg = tokenizer, prompt_cfg
        self.prompts: list[str] = []
        self.label_ids: list[list[int]] = []
        self.slots: dict[str, list[tuple[int, int]]] = {}  # group -> (start, end) per list

    def add(self, group: str, examples: Sequence[RerankExample], order_shifts: Sequence[int]) -> None:
        """Each list of ``group`` once per cyclic shift in ``order_shifts`` (``RerankExample.shifted_messages``)."""
        spans = self.slots.setdefault(group, [])
        for e in examples:
            start = len(self.prompts)
            for s in order_shifts:
                self.prompts.append(render(self.tokenizer, e.shifted_messages(s, self.prompt_cfg)))
                self.label_ids.append([token for _, token in e.labels])
            spans.append((start, len(self.prompts)))

    def split(self, scores: list[np.ndarray], group: str) -> list[list[np.ndarray]]:
        """The job's scores (one per prompt) of ``group``: per list, one per order shown."""
        return [scores[a:b] for a, b in self.slots.get(group, [])]


def hf_label_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], label_token_ids: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    """Next-token log-probabilities of each prompt's labels, renormalised over the labels only.

    One forward pass per rendered prompt (tokenized without special tokens, as the engine sends them);
    ``log_softmax`` over the label logits alone equals vLLM's processed log-probs under
    ``allowed_token_ids``. Returns one (k,) float64 array per prompt, in ``label_token_ids`` order.
    """
    import torch

    if len(prompts) != len(label_token_ids):
        raise ValueError(f"got {len(prompts)} prompts but {len(label_token_ids)} label id lists")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for prompt, ids in zip(prompts, label_token_ids, strict=True):
                enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
                logits = model(**enc, logits_to_keep=1).logits[0, -1].float()  # (V,)
                label_logits = logits[torch.as_tensor(list(ids), device=device)]  # (k,)
                out.append(torch.log_softmax(label_logits, dim=-1).cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    return out


def rerank_order(scores: Sequence[float] | np.ndarray, candidates: Sequence[int]) -> list[int]:
    """Candidates sorted by score, best first; ties (and NaN, last) keep the retriever's order."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (len(candidates),):
        raise ValueError(f"got {values.shape} scores for {len(candidates)} candidates")
    return [candidates[i] for i in order(values)]


def order_stats(scores: Sequence[Sequence[float] | np.ndarray], target_positions: Sequence[int]) -> dict[str, float]:
    """How a re-ranker's scores relate to the retriever's order (the candidates as shown, position 0 its
    top), over prompts whose target is among the candidates: does the LLM follow position, or the target?

    ``top_is_retrievers_top``: share of prompts whose best-scored candidate is position 0;
    ``spearman_with_retriever``: mean rank correlation of the scores with the retriever's order (1: the
    LLM keeps the order, 0: unrelated, -1: reverses it); ``target_position_before`` / ``_after``: mean
    1-based position of the true item in the retriever's order and in the re-ranked one.
    """
    if len(scores) != len(target_positions):
        raise ValueError(f"got {len(scores)} score lists for {len(target_positions)} targets")
    if not scores:
        return {}
    first, rho, after = [], [], []
    for values, target in zip(scores, target_positions, strict=True):
        best_first = order(values)  # positions, best first
        first.append(best_first[0] == 0)
        n = len(best_first)
        llm_rank = np.empty(n)
        llm_rank[best_first] = np.arange(n)
        rho.append(np.corrcoef(llm_rank, np.arange(n))[0, 1] if n > 1 else 1.0)
        after.append(int(llm_rank[target]) + 1)
    return {
        "prompts": len(scores),
        "top_is_retrievers_top": float(np.mean(first)),
        "spearman_with_retriever": float(np.mean(rho)),
        "target_position_before": float(np.mean(np.asarray(target_positions) + 1)),
        "target_position_after": float(np.mean(after)),
    }
