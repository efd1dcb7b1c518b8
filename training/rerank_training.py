"""The re-rank stage (SPEC section 1; LlamaRec's verbalizer, Yue et al., arXiv 2311.02089).

1. Lists (``training.rerank``): shuffled training lists from every user's newest training positions
   (a seeded sample of ``rerank.train_lists`` trains, calibration lists come from the rest); evaluation
   lists, the served retriever's top K in its order with its scores, for the validation step, the test
   step and the cold slice (the test step with only the newest ``rerank.cold_items`` items).
2. SFT on the target's label, then DPO continuing the SFT adapter (chosen = the target's label,
   rejected = random wrong labels of the list); one rerank adapter on the base model.
3. Scoring, per model (zero-shot, SFT, SFT+DPO), one engine each: the calibration lists under cyclic
   shifts (PriDe's label prior, ``llm.scoring``), the test and cold lists (and, for SFT+DPO, the
   validation lists) under ``rerank.permutations`` orders.
4. Fusion: ``z(retriever) + w z(LLM)`` with w from ``rerank.fusion_weights`` chosen on the **validation**
   lists only (ties: the smaller w; 0 = the retriever alone). The chosen ``llm.scoring.ScoringSpec``
   goes into ``llm.json``, so the service scores the way this job measured.

Only lists whose target is among the K are scored: re-ordering the K cannot move any other user, who
keeps the retriever's rank (the same metric, a fraction of the work).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.labels import candidate_labels
from llm.prompts import history_text, render
from llm.scoring import ScoringSpec, estimate_prior, fused_scores, item_logprobs, order, shifts
from rundir.items import prompt_items
from training import ranking_metrics as M
from training.dpo import train_dpo, train_sft
from training.engines import engine_cfg, engine_jobs, policy, run_isolated
from training.rerank import (
    RerankExample,
    dpo_rows,
    evaluation_examples,
    list_positions,
    negative_counts,
    order_stats,
    retrieve,
    sft_rows,
    training_lists,
)
from training.retriever import score_users
from training.stages import (
    Served,
    StageInputs,
    StageTimer,
    compare,
    curve_json,
    popularity_scores,
    prompt_config,
    ranks_on_test,
    sample_users,
    train_summary,
)

log = logging.getLogger(__name__)

ZERO_SHOT, ZERO_SHOT_DEBIASED, SFT, SFT_DPO = (
    "LLM re-rank zero-shot",
    "LLM re-rank zero-shot, de-biased",
    "LLM re-rank SFT",
    "LLM re-rank SFT+DPO",
)
FUSED = "Served: retriever + w x LLM (SFT+DPO)"
RERANK_ROWS = (ZERO_SHOT, ZERO_SHOT_DEBIASED, SFT, SFT_DPO, FUSED)
COLD = " (cold)"
COLD_RETRIEVER = "served retriever" + COLD
RERANK_METRICS = ("NDCG@10", "MRR@10")  # re-ordering inside the top K cannot change Recall@K


def rerank_comparisons(
    per_user: dict[str, dict[str, np.ndarray]], served_row: str, n_boot: int
) -> list[dict[str, Any]]:
    """Each re-rank row against the retriever it re-ranks (full set and cold slice), and DPO against SFT."""
    out = []
    for name in RERANK_ROWS:
        out += compare(per_user, name, served_row, RERANK_METRICS, n_boot)
        if name + COLD in per_user:
            out += compare(per_user, name + COLD, COLD_RETRIEVER, RERANK_METRICS, n_boot)
    return out + compare(per_user, SFT_DPO, SFT, RERANK_METRICS, n_boot)


@dataclass
class RerankLists:
    train: list[RerankExample]  # shuffled lists SFT and DPO train on
    calibration: list[RerankExample]  # shuffled lists not trained on: the label prior
    valid: list[RerankExample]  # retriever order: train -> validation item (chooses the fusion weight)
    test: list[RerankExample]  # retriever order: train + valid -> test item
    cold: list[RerankExample]  # retriever order: the newest cold_items of train + valid -> test item
    cold_ranks: np.ndarray | None  # (U,) the served retriever's test ranks on the cut histories


@dataclass
class RerankResult:
    """What the re-rank stage made: its rows (full set and cold slice), the adapter, the served scoring."""

    ranks: dict[str, np.ndarray]
    adapter: Path  # the SFT+DPO re-rank adapter
    scoring: ScoringSpec  # the label prior, fusion weight and orders the service scores with (llm.json)
    doc: dict[str, Any]  # metrics.json additions ("rerank", "dpo_curves")


def rerank_lists(inp: StageInputs, tokenizer: Any, out: Served) -> RerankLists:
    """Every list the job trains, calibrates, chooses and measures on (see the module text)."""
    cfg, split, rc, catalog = inp.cfg, inp.split, inp.cfg.rerank, inp.catalog
    labels = candidate_labels(tokenizer, rc.k)
    prompt_cfg = prompt_config(cfg)
    retriever = out.retriever
    prefs = {u: out.vectors[i] for i, u in enumerate(inp.users)}
    train = {u: split.users[u].train for u in inp.users}
    banned = {u: [split.users[u].valid, split.users[u].test] for u in inp.users}

    # training pool: (user, t) positions; a seeded sample trains, calibration lists come from the rest
    pool = [
        (u, t)
        for u in inp.users
        for t in list_positions(catalog, train[u], out.texts.get(u, ""), rc.positions_per_user)
    ]
    keys = [f"{u}@{t}" for u, t in pool]
    picked = set(sample_users(keys, rc.train_lists, rc.seed))
    rest = [p for p, key in zip(pool, keys, strict=True) if key not in picked]
    calibration = [
        rest[i] for i in sorted(np.random.default_rng(rc.seed + 1).permutation(len(rest))[: rc.calibration_lists])
    ]
    chosen = [p for p, key in zip(pool, keys, strict=True) if key in picked]
    wanted = chosen + calibration
    n_hard = negative_counts(rc.k, rc.negatives.hard, rc.negatives.popular, rc.negatives.uniform)
    ranked_keys = [f"{u}@{t}" for u, t in wanted]
    ranked = retrieve(
        retriever,
        {f"{u}@{t}": train[u][:t] for u, t in wanted},
        {f"{u}@{t}": prefs[u] for u, t in wanted},
        ranked_keys,
        n_hard[0] + 2,
        banned={f"{u}@{t}": [*banned[u], train[u][t]] for u, t in wanted},
    )
    popularity = popularity_scores(catalog, train)
    args = (
        train,
        banned,
        {key: items for key, (items, _) in ranked.items()},
        popularity,
        out.texts,
        labels,
        prompt_cfg,
        n_hard,
        rc.seed,
    )
    train_lists_ = training_lists(catalog, chosen, *args)
    calibration_lists = training_lists(catalog, calibration, *args)

    # evaluation lists in the served retriever's order
    def evaluation(
        histories: dict[str, list[int]],
        targets: dict[str, int],
        vectors: dict[str, np.ndarray],
        texts: dict[str, str],
        seen: dict[str, list[int]] | None = None,  # excluded beyond the history itself
    ) -> list[RerankExample]:
        got = retrieve(retriever, histories, vectors, inp.users, rc.k, banned=seen)
        return evaluation_examples(catalog, inp.users, histories, targets, got, texts, labels, prompt_cfg)

    valid = evaluation(train, {u: split.users[u].valid for u in inp.users}, prefs, out.texts)
    served_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in inp.users}
    tests = {u: split.users[u].test for u in inp.users}
    test = evaluation(served_seqs, tests, prefs, out.texts)
    cold: list[RerankExample] = []
    cold_ranks = None
    if rc.cold_items:  # the same users, newest cold_items items; a history-text stand-in for the preference
        cut = {u: served_seqs[u][-rc.cold_items :] for u in inp.users}
        stand_in = {u: history_text(prompt_items(catalog, cut[u]), prompt_cfg) for u in inp.users}
        vectors = inp.encoder.encode([stand_in[u] for u in inp.users])
        cold_prefs = {u: vectors[i] for i, u in enumerate(inp.users)}
        cold = evaluation(cut, tests, cold_prefs, stand_in, seen=served_seqs)  # seen items stay excluded
        cold_ranks = ranks_on_test(score_users(retriever, cut, cold_prefs, inp.users), split, inp.users)
    return RerankLists(train_lists_, calibration_lists, valid, test, cold, cold_ranks)


def _hits(examples: Sequence[RerankExample]) -> list[RerankExample]:
    return [e for e in examples if e.target_position is not None]


class _Prompts:
    """The prompts of one engine job, and where each list's orders landed in them."""

    def __init__(self, tokenizer: Any, prompt_cfg: Any) -> None:
        self.tokenizer, self.prompt_cfg = tokenizer, prompt_cfg
        self.prompts: list[str] = []
        self.label_ids: list[list[int]] = []
        self.slots: dict[str, list[tuple[int, int]]] = {}  # group -> (start, end) per list

    def add(self, group: str, examples: Sequence[RerankExample], order_shifts: Sequence[int]) -> None:
        spans = self.slots.setdefault(group, [])
        for e in examples:
            start = len(self.prompts)
            for s in order_shifts:
                self.prompts.append(render(self.tokenizer, e.shifted_messages(s, self.prompt_cfg)))
                self.label_ids.append([token for _, token in e.labels])
            spans.append((start, len(self.prompts)))

    def split(self, scores: list[np.ndarray], group: str) -> list[list[np.ndarray]]:
        return [scores[a:b] for a, b in self.slots.get(group, [])]


def _label_histogram(scores: Sequence[np.ndarray], k: int) -> list[float]:
    """Share of lists whose best-scored label is A, B, ... (by position). Not rounded: the shares sum to 1
    (rounded to 4 places, 15 lists' shares summed to 1.0001 on a bf16 engine)."""
    top = [int(order(s)[0]) for s in scores]
    return (np.bincount(top, minlength=k) / len(top)).tolist() if top else [0.0] * k


def choose_weight(
    valid: Sequence[RerankExample], llm_scores: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[float, list[float]]:
    """The fusion weight with the best validation NDCG@10 over the scored validation lists (ties: the
    smaller weight, so the LLM must earn a weight above 0), and that NDCG for every weight tried."""
    if not valid:
        return 0.0, [0.0 for _ in weights]
    curve = []
    for w in weights:
        ranks = [
            int(np.flatnonzero(order(fused_scores(np.asarray(e.retriever_scores), s, w)) == e.target_position)[0])
            for e, s in zip(valid, llm_scores, strict=True)
        ]
        curve.append(float(M.per_user(np.array(ranks), ks=(10,))["NDCG@10"].mean()))
    best = max(curve)
    chosen = min(w for w, v in zip(weights, curve, strict=True) if v >= best - 1e-12)
    return float(chosen), [round(v, 6) for v in curve]


def train_reranker(inp: StageInputs, served: Served, tokenizer: Any, work: Path, timer: StageTimer) -> RerankResult:
    """Lists, SFT, DPO, scoring with the prior removed, the fusion weight; rows vs the served retriever."""
    cfg, rc = inp.cfg, inp.cfg.rerank
    prompt_cfg = prompt_config(cfg)
    with timer("rerank_lists"):
        lists = rerank_lists(inp, tokenizer, served)
    test, valid, cold = _hits(lists.test), _hits(lists.valid), _hits(lists.cold)
    counts = negative_counts(rc.k, rc.negatives.hard, rc.negatives.popular, rc.negatives.uniform)
    info: dict[str, Any] = {
        "k": rc.k,
        "users": len(lists.test),
        "scored_users": len(test),
        "candidate_recall": len(test) / max(len(lists.test), 1),
        "train_lists": len(lists.train),
        "train_users": len({e.user_id for e in lists.train}),
        "negatives": dict(zip(("hard", "popular", "uniform"), counts, strict=True)),
        "train_target_labels": np.bincount([e.target_position for e in lists.train], minlength=rc.k).tolist(),
        "calibration_lists": len(lists.calibration),
        "valid_scored_users": len(valid),
        "cold_scored_users": len(cold),
        "debias": rc.debias,
        "permutations": rc.permutations,
    }
    log.info(
        "re-rank: %d training lists from %d users; %d of %d test items among the top %d (only those are scored)",
        len(lists.train),
        info["train_users"],
        len(test),
        len(lists.test),
        rc.k,
    )
    with timer("rerank_sft"):
        sft = train_sft(inp.model_dir, sft_rows(lists.train), rc.sft, work / "rerank_sft")
    with timer("rerank_dpo"):
        pairs = dpo_rows(lists.train, rc.dpo_rejected, rc.seed)
        dpo = train_dpo(inp.model_dir, pairs, rc.dpo, work / "rerank_dpo", init_adapter=sft.adapter_dir)
    info["sft"], info["dpo"] = train_summary(sft), train_summary(dpo)
    info["dpo"]["pairs"] = len(pairs)
    curves = {"rerank SFT": curve_json(sft), "rerank SFT+DPO": curve_json(dpo)}

    orders = shifts(rc.k, rc.permutations)
    calibration_shifts = shifts(rc.k, rc.calibration_shifts or rc.k)
    with timer("rerank_score"):
        batches = []
        for name in ("zero-shot", "SFT", "SFT+DPO"):
            p = _Prompts(tokenizer, prompt_cfg)
            p.add("calibration", lists.calibration, calibration_shifts)
            p.add("test", test, orders)
            p.add("cold", cold, orders)
            if name == "SFT+DPO":
                p.add("valid", valid, orders)
            batches.append(p)
        adapters = (None, sft.adapter_dir, dpo.adapter_dir)
        jobs = [
            {"kind": "score", "prompts": b.prompts, "label_ids": b.label_ids, **policy(cfg, inp.model_dir, a, work)}
            for b, a in zip(batches, adapters, strict=True)
        ]
        raw = run_isolated(engine_jobs, engine_cfg(cfg), jobs)

    groups = [("test", test, lists.test, served.ranks, "")]
    if lists.cold_ranks is not None:
        groups.append(("cold", cold, lists.cold, lists.cold_ranks, COLD))
    variants = {  # row -> (engine batch, de-biased?)
        ZERO_SHOT: (0, False),
        ZERO_SHOT_DEBIASED: (0, True),
        SFT: (1, rc.debias == "pride"),
        SFT_DPO: (2, rc.debias == "pride"),
    }
    info["order"], info["top_label"], info["prior"] = {}, {}, {}
    rows: dict[str, dict[str, np.ndarray]] = {"": {}, COLD: {}}  # full set, cold slice
    llm_scores: dict[tuple[str, str], list[np.ndarray]] = {}
    specs: dict[str, ScoringSpec] = {}
    for row, (b, debiased) in variants.items():
        calibration = batches[b].split(raw[b], "calibration")
        prior = tuple(estimate_prior(calibration).round(6)) if debiased else None
        spec = specs[row] = ScoringSpec(weight=None, log_prior=prior, permutations=rc.permutations)
        info["prior"][row] = list(prior) if prior else None
        # where the top answer falls on the shuffled calibration lists (each shift a list): the label prior
        shown = [item_logprobs([s], [0], spec) for per in calibration for s in per]
        info["top_label"][row] = _label_histogram(shown, rc.k)
        for group, scored, every, base, suffix in groups:
            scores = llm_scores[row, group] = [
                item_logprobs(per, orders, spec) for per in batches[b].split(raw[b], group)
            ]
            rows[suffix][row + suffix] = _rerank_ranks(base, every, scored, scores)
            if group == "test":
                info["order"][row] = order_stats(scores, [e.target_position for e in scored])

    # the fusion weight, on validation lists only
    valid_scores = [item_logprobs(per, orders, specs[SFT_DPO]) for per in batches[2].split(raw[2], "valid")]
    weight, curve = choose_weight(valid, valid_scores, rc.fusion_weights)
    info["fusion"] = {"weights": list(rc.fusion_weights), "valid_ndcg10_of_scored": curve, "chosen": weight}
    log.info(
        "re-rank: fusion weight %g chosen on %d validation lists (NDCG@10 by weight: %s)", weight, len(valid), curve
    )
    for group, scored, every, base, suffix in groups:
        fused = [
            fused_scores(np.asarray(e.retriever_scores), s, weight)
            for e, s in zip(scored, llm_scores[SFT_DPO, group], strict=True)
        ]
        rows[suffix][FUSED + suffix] = _rerank_ranks(base, every, scored, fused)
    ranks = dict(rows[""])
    if lists.cold_ranks is not None:
        ranks[COLD_RETRIEVER] = lists.cold_ranks
        ranks.update(rows[COLD])
    scoring = ScoringSpec(weight=weight, log_prior=specs[SFT_DPO].log_prior, permutations=rc.permutations)
    return RerankResult(ranks, dpo.adapter_dir, scoring, {"rerank": info, "dpo_curves": curves})


def _rerank_ranks(
    base: np.ndarray, all_lists: Sequence[RerankExample], scored: Sequence[RerankExample], scores: Sequence[np.ndarray]
) -> np.ndarray:
    """``base`` (U,) with each scored list's target moved to its place in the scores' order."""
    index = {e.user_id: i for i, e in enumerate(all_lists)}
    ranks = base.copy()
    for e, s in zip(scored, scores, strict=True):
        ranks[index[e.user_id]] = int(np.flatnonzero(order(s) == e.target_position)[0])
    return ranks
