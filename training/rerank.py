"""The re-rank job's training side: candidate lists, SFT targets, DPO pairs, and a transformers scorer.

The re-rank job is LlamaRec's verbalizer (Yue et al., arXiv 2311.02089): the retriever proposes K
candidates, the prompt lists them under single-token labels (``llm.labels``), and the next-token
log-probabilities of the labels, read in one forward pass, score them all. Its alignment (SPEC section
1): supervised on the true next item's label, then DPO with chosen = the true label and rejected = the
label of the retriever's highest-ranked wrong candidate.

Training examples predict the **validation** item from the training sequence (never the test item).
When the retriever missed the true item, training examples insert it at a random position (seeded per
user, so a rebuild gives the same lists); evaluation examples never do (a miss then scores 0).

:func:`hf_label_logprobs` scores prompts with a transformers model exactly as ``llm.engine.score_labels``
does with vLLM (log-softmax over the label tokens only), so training-side evaluation and serving agree.
Measured against vLLM (bf16 engine, 20 labels, 6 re-rank prompts): the tiny test model agrees to 0.0015
(max abs log-prob); the real SmolLM2-135M to 0.19 max / 0.04 mean with transformers in float32 (0.23 /
0.06 in bf16), the argmax always the same. The gap is bf16 arithmetic in vLLM over 30 layers, not a
different formula; compare in float32 on both sides when exact agreement matters.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.labels import Label
from llm.prompts import HistoryItem, PromptConfig, rerank_messages
from retrieval.catalog import Catalog
from retrieval.sasrec import SASRec
from training.preferences import history_items
from training.retriever import score_users
from training.split import Split

Message = dict[str, str]


@dataclass
class RerankExample:
    user_id: str
    candidates: list[int]  # item indices in the order shown (retriever order; an inserted target among them)
    labels: list[Label]  # (text, token id) per candidate position
    messages: list[Message]  # llm.prompts.rerank_messages; render() them for vLLM
    target: int  # the true next item
    target_position: int | None  # its position in candidates; None if the retriever missed it (evaluation)
    inserted: bool = False  # the target was put in by hand (training examples only)

    @property
    def target_label(self) -> str | None:
        return None if self.target_position is None else self.labels[self.target_position][0]

    @property
    def negative_position(self) -> int:
        """Position of the retriever's highest-ranked wrong candidate (the DPO rejected answer)."""
        return next(i for i, item in enumerate(self.candidates) if item != self.target)


def retrieve(
    model: SASRec,
    seqs: Mapping[str, Sequence[int]],
    prefs: Mapping[str, np.ndarray] | None,
    users: Sequence[str],
    k: int,
    batch_size: int = 512,
) -> dict[str, list[int]]:
    """The retriever's top-``k`` items per user, best first, items of ``seqs[u]`` excluded.

    Ties are broken by the lower item index, so the lists are deterministic.
    """
    out: dict[str, list[int]] = {}
    for start in range(0, len(users), batch_size):
        chunk = list(users[start : start + batch_size])
        scores = score_users(model, seqs, prefs, chunk, batch_size).astype(np.float64)  # (b, N+1)
        scores[:, 0] = -np.inf
        for row, user in enumerate(chunk):
            seen = np.asarray(list(seqs[user]), dtype=np.int64)
            scores[row, seen] = -np.inf
            top = np.argsort(-scores[row], kind="stable")[:k]
            out[user] = [int(i) for i in top]
    return out


def candidate_list(
    user: str, ranked: Sequence[int], target: int, k: int, insert_target: bool, seed: int
) -> tuple[list[int], int | None, bool]:
    """The K shown candidates, the target's position (or None) and whether it was inserted."""
    shown = [int(i) for i in ranked[:k]]
    if len(shown) < k:
        raise ValueError(f"user {user!r}: the retriever gave {len(shown)} candidates, fewer than k={k}")
    if target in shown:
        return shown, shown.index(target), False
    if not insert_target:
        return shown, None, False
    # The retriever's top K-1 keep their order; the target goes to a random slot, seeded per user so the
    # same split gives the same lists on every run (crc32, unlike hash(), is stable across processes).
    rng = np.random.default_rng([seed, zlib.crc32(user.encode("utf-8"))])
    position = int(rng.integers(0, k))
    shown = shown[: k - 1]
    shown.insert(position, int(target))
    return shown, position, True


def build_examples(
    catalog: Catalog,
    users: Sequence[str],
    histories: Mapping[str, Sequence[int]],
    targets: Mapping[str, int],
    ranked: Mapping[str, Sequence[int]],
    preferences: Mapping[str, str],
    labels: Sequence[Label],
    prompt_cfg: PromptConfig,
    ratings: Mapping[str, Sequence[float]] | None = None,
    insert_target: bool = True,
    seed: int = 0,
) -> list[RerankExample]:
    """One re-rank example per user: K = len(labels) candidates from ``ranked[u]`` (best first).

    histories[u]: what the prompt may show (the training sequence for training examples); targets[u]:
    the true next item; preferences[u]: the preference text ('' if none).
    """
    k = len(labels)
    texts = [text for text, _ in labels]
    examples = []
    for user in users:
        shown, position, inserted = candidate_list(user, ranked[user], targets[user], k, insert_target, seed)
        recent = history_items(catalog, histories[user], ratings[user] if ratings is not None else None)
        items = [_candidate(catalog, i) for i in shown]
        messages = rerank_messages(preferences.get(user, ""), recent, items, texts, prompt_cfg)
        examples.append(
            RerankExample(
                user_id=user,
                candidates=shown,
                labels=list(labels),
                messages=messages,
                target=int(targets[user]),
                target_position=position,
                inserted=inserted,
            )
        )
    return examples


def validation_examples(
    catalog: Catalog,
    split: Split,
    users: Sequence[str],
    ranked: Mapping[str, Sequence[int]],
    preferences: Mapping[str, str],
    labels: Sequence[Label],
    prompt_cfg: PromptConfig,
    insert_target: bool = True,
    seed: int = 0,
) -> list[RerankExample]:
    """Training examples from a split: training sequence in, the validation item as the target."""
    histories = {u: split.users[u].train for u in users}
    targets = {u: split.users[u].valid for u in users}
    ratings = {u: split.users[u].train_ratings for u in users}
    return build_examples(
        catalog,
        users,
        histories,
        targets,
        ranked,
        preferences,
        labels,
        prompt_cfg,
        ratings=ratings,
        insert_target=insert_target,
        seed=seed,
    )


def _candidate(catalog: Catalog, index: int) -> HistoryItem:
    item = catalog[index]
    return HistoryItem(title=item.title, genres=item.genres, year=item.year)


def sft_rows(examples: Sequence[RerankExample]) -> list[dict[str, Any]]:
    """{prompt, completion} rows for ``training.dpo.train_sft``: the true item's label."""
    return [
        {"user_id": e.user_id, "prompt": e.messages, "completion": e.target_label}
        for e in examples
        if e.target_label is not None
    ]


def dpo_rows(examples: Sequence[RerankExample]) -> list[dict[str, Any]]:
    """{prompt, chosen, rejected} rows for ``training.dpo.train_dpo``: true label vs the hard negative."""
    return [
        {
            "user_id": e.user_id,
            "prompt": e.messages,
            "chosen": e.target_label,
            "rejected": e.labels[e.negative_position][0],
        }
        for e in examples
        if e.target_label is not None
    ]


# ---- scoring --------------------------------------------------------------------------------------------


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
    values = np.where(np.isnan(values), -np.inf, values)
    return [candidates[i] for i in np.argsort(-values, kind="stable")]


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
        s = np.where(np.isnan(np.asarray(values, dtype=np.float64)), -np.inf, np.asarray(values, dtype=np.float64))
        order = np.argsort(-s, kind="stable")  # positions, best first (rerank_order's rule)
        first.append(order[0] == 0)
        llm_rank = np.empty(len(s))
        llm_rank[order] = np.arange(len(s))
        rho.append(np.corrcoef(llm_rank, np.arange(len(s)))[0, 1] if len(s) > 1 else 1.0)
        after.append(int(llm_rank[target]) + 1)
    return {
        "prompts": len(scores),
        "top_is_retrievers_top": float(np.mean(first)),
        "spearman_with_retriever": float(np.mean(rho)),
        "target_position_before": float(np.mean(np.asarray(target_positions) + 1)),
        "target_position_after": float(np.mean(after)),
    }
