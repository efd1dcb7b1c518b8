"""The re-rank stage (SPEC section 1; LlamaRec's verbalizer, Yue et al., arXiv 2311.02089).

1. Lists (``training.rerank``): shuffled training lists from every user's newest training positions
   (a seeded sample of ``rerank.train_lists`` trains, calibration lists come from the rest, and
   ``rerank.cold_lists`` more of the rest train as lists of the cold kind: the newest few items, their
   history text as the preference, uniform negatives); evaluation lists, the served retriever's top K in its
   order with its scores, for the validation step, the test step and the cold slice (the test step with
   only the newest ``rerank.cold_items`` items).
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

``train_reranker`` composes the steps, each a function with a frozen result: ``rerank_lists`` -> ``RerankLists``,
``train_adapters`` -> ``RerankAdapters``, ``score_lists`` -> ``ListScores``, ``label_priors`` -> ``LabelPriors``,
``choose_fusion`` -> ``FusionChoice``; then the rows -> ``RerankResult``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.labels import candidate_labels
from llm.scoring import ScoringSpec, estimate_prior, fused_scores, item_logprobs, order, shifts
from training import ranking_metrics as M
from training.config import RerankSection
from training.dpo import TrainResult, train_dpo, train_sft
from training.engines import EngineJob, engine_cfg, engine_jobs, policy, run_isolated
from training.rerank import (
    RerankExample,
    ScoringPrompts,
    dpo_rows,
    draw_positions,
    evaluation_examples,
    list_positions,
    negative_counts,
    order_stats,
    retrieve,
    sft_rows,
    stand_in_text,
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

COLD_TRAIN_ITEMS = 3  # the cold training lists' history when rerank.cold_items is 0 (the service's new_users_3)
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
MODELS = ("zero-shot", "SFT", "SFT+DPO")  # scored by one engine job each: the base model, then each adapter
ROW_MODELS = {ZERO_SHOT: "zero-shot", ZERO_SHOT_DEBIASED: "zero-shot", SFT: "SFT", SFT_DPO: "SFT+DPO"}  # row -> model


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


@dataclass(frozen=True)
class RerankLists:
    train: list[RerankExample]  # shuffled lists SFT and DPO train on
    calibration: list[RerankExample]  # shuffled lists not trained on: the label prior
    valid: list[RerankExample]  # retriever order: train -> validation item (chooses the fusion weight)
    test: list[RerankExample]  # retriever order: train + valid -> test item
    cold: list[RerankExample]  # retriever order: the newest cold_items of train + valid -> test item
    cold_ranks: np.ndarray | None  # (U,) the served retriever's test ranks on the cut histories
    cold_train: int = 0  # the last cold_train of train are of the cold kind (rerank.cold_lists)


@dataclass(frozen=True)
class RerankResult:
    """What the re-rank stage made: its rows (full set and cold slice), the adapter, the served scoring."""

    ranks: dict[str, np.ndarray]
    adapter: Path  # the SFT+DPO re-rank adapter
    scoring: ScoringSpec  # the label prior, fusion weight and orders the service scores with (llm.json)
    doc: dict[str, Any]  # metrics.json additions ("rerank", "dpo_curves")


@dataclass(frozen=True)
class RerankAdapters:
    """The re-rank trainings: SFT on the target labels, then DPO continuing the SFT adapter."""

    sft: TrainResult
    dpo: TrainResult  # its adapter is the one served
    pairs: int  # DPO pairs trained on

    def info(self) -> dict[str, Any]:
        """metrics.json "rerank": "sft", "dpo" (with its pairs)."""
        return {"sft": train_summary(self.sft), "dpo": {**train_summary(self.dpo), "pairs": self.pairs}}

    def curves(self) -> dict[str, Any]:
        """metrics.json "dpo_curves" of this stage."""
        return {"rerank SFT": curve_json(self.sft), "rerank SFT+DPO": curve_json(self.dpo)}


@dataclass(frozen=True)
class ListScores:
    """The engine's label log-probs per model (``MODELS``) and list group ("calibration", "test", "cold",
    "valid"): per list, one (k,) array per order shown."""

    by_model: dict[str, dict[str, list[list[np.ndarray]]]]

    def of(self, model: str, group: str) -> list[list[np.ndarray]]:
        return self.by_model[model].get(group, [])


@dataclass(frozen=True)
class LabelPriors:
    """How each re-rank row reads its model's scores (PriDe's label prior removed or not)."""

    specs: dict[str, ScoringSpec]  # row -> its scoring, no fusion weight yet; log_prior None: not de-biased
    top_label: dict[str, list[float]]  # row -> share of shuffled calibration lists whose best label is A, B, ...

    def info(self) -> dict[str, list[float] | None]:
        """metrics.json "rerank": "prior", per row."""
        return {row: list(s.log_prior) if s.log_prior else None for row, s in self.specs.items()}


@dataclass(frozen=True)
class FusionChoice:
    """The fusion weight chosen on the validation lists."""

    weights: tuple[float, ...]  # the weights tried (``rerank.fusion_weights``)
    curve: list[float]  # validation NDCG@10 of the scored lists per weight
    chosen: float

    def info(self) -> dict[str, Any]:
        """metrics.json "rerank": "fusion"."""
        return {"weights": list(self.weights), "valid_ndcg10_of_scored": self.curve, "chosen": self.chosen}


@dataclass(frozen=True)
class _Group:
    """Lists the rows are measured on: the test lists, or the cold slice's."""

    name: str  # the prompts' group: "test" or "cold"
    every: list[RerankExample]  # every user's list, in user order
    scored: list[RerankExample]  # those whose target is among the K
    base: np.ndarray  # (U,) the served retriever's test ranks on these histories
    suffix: str  # the rows' name suffix: "" or COLD


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
    calibration = draw_positions(rest, rc.calibration_lists, rc.seed + 1)
    chosen = [p for p, key in zip(pool, keys, strict=True) if key in picked]
    calibrated = set(calibration)
    spare = [p for p in rest if p not in calibrated]  # neither trained nor calibrated on
    cold_positions = draw_positions(spare, rc.cold_lists, rc.seed + 2)
    wanted = chosen + calibration
    n_hard = negative_counts(rc.k, rc.negatives.hard, rc.negatives.popular, rc.negatives.uniform)
    ranked_keys = [f"{u}@{t}" for u, t in wanted]
    reads = retriever.cfg.pref_dim > 0  # plain SASRec (what selection may serve) takes no preference vector
    ranked = retrieve(
        retriever,
        {f"{u}@{t}": train[u][:t] for u, t in wanted},
        {f"{u}@{t}": prefs[u] for u, t in wanted} if reads else None,
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
    # the cold kind: the newest items and their stand-in text, K-1 uniform negatives (the retriever's unused)
    cold_train = training_lists(
        catalog,
        cold_positions,
        train,
        banned,
        {f"{u}@{t}": [] for u, t in cold_positions},
        popularity,
        {},
        labels,
        prompt_cfg,
        (0, 0, rc.k - 1),
        rc.seed,
        cut=rc.cold_items or COLD_TRAIN_ITEMS,
    )

    # evaluation lists in the served retriever's order
    def evaluation(
        histories: dict[str, list[int]],
        targets: dict[str, int],
        vectors: dict[str, np.ndarray],
        texts: dict[str, str],
        seen: dict[str, list[int]] | None = None,  # excluded beyond the history itself
    ) -> list[RerankExample]:
        got = retrieve(retriever, histories, vectors if reads else None, inp.users, rc.k, banned=seen)
        return evaluation_examples(catalog, inp.users, histories, targets, got, texts, labels, prompt_cfg)

    valid = evaluation(train, {u: split.users[u].valid for u in inp.users}, prefs, out.texts)
    served_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in inp.users}
    tests = {u: split.users[u].test for u in inp.users}
    test = evaluation(served_seqs, tests, prefs, out.texts)
    cold: list[RerankExample] = []
    cold_ranks = None
    if rc.cold_items:  # the same users, newest cold_items items; a history-text stand-in for the preference
        cut = {u: served_seqs[u][-rc.cold_items :] for u in inp.users}
        stand_in = {u: stand_in_text(catalog, cut[u], prompt_cfg) for u in inp.users}
        cold_prefs: dict[str, np.ndarray] = {}
        if reads:  # the stand-ins' vectors, for a retriever that reads them
            vectors = inp.encoder.encode([stand_in[u] for u in inp.users])
            cold_prefs = {u: vectors[i] for i, u in enumerate(inp.users)}
        cold = evaluation(cut, tests, cold_prefs, stand_in, seen=served_seqs)  # seen items stay excluded
        cold_scores = score_users(retriever, cut, cold_prefs if reads else None, inp.users)
        cold_ranks = ranks_on_test(cold_scores, split, inp.users)
    return RerankLists(train_lists_ + cold_train, calibration_lists, valid, test, cold, cold_ranks, len(cold_train))


def _hits(examples: Sequence[RerankExample]) -> list[RerankExample]:
    return [e for e in examples if e.target_position is not None]


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
    rc = inp.cfg.rerank
    with timer("rerank_lists"):
        lists = rerank_lists(inp, tokenizer, served)
    info = _lists_info(lists, rc)
    adapters = train_adapters(inp, lists, work, timer)
    with timer("rerank_score"):
        scores = score_lists(inp, lists, adapters, tokenizer, work)
    priors = label_priors(scores, rc)
    groups = _groups(lists, served)
    llm = _item_scores(scores, priors, groups, rc)
    fusion = choose_fusion(lists, scores, priors, rc)
    info |= adapters.info() | {
        "order": _order_info(llm, groups[0]),
        "top_label": priors.top_label,
        "prior": priors.info(),
        "fusion": fusion.info(),
    }
    scoring = ScoringSpec(weight=fusion.chosen, log_prior=priors.specs[SFT_DPO].log_prior, permutations=rc.permutations)
    ranks = _rerank_rows(groups, llm, fusion.chosen)
    return RerankResult(ranks, adapters.dpo.adapter_dir, scoring, {"rerank": info, "dpo_curves": adapters.curves()})


def _lists_info(lists: RerankLists, rc: RerankSection) -> dict[str, Any]:
    """metrics.json "rerank": what the lists hold (only lists whose target is among the K are scored)."""
    test, valid, cold = _hits(lists.test), _hits(lists.valid), _hits(lists.cold)
    counts = negative_counts(rc.k, rc.negatives.hard, rc.negatives.popular, rc.negatives.uniform)
    info: dict[str, Any] = {
        "k": rc.k,
        "users": len(lists.test),
        "scored_users": len(test),
        "candidate_recall": len(test) / max(len(lists.test), 1),
        "train_lists": len(lists.train),
        "cold_train_lists": lists.cold_train,
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
        "re-rank: %d training lists (%d of the cold kind) from %d users; %d of %d test items among the top %d "
        "(only those are scored)",
        len(lists.train),
        lists.cold_train,
        info["train_users"],
        len(test),
        len(lists.test),
        rc.k,
    )
    return info


def train_adapters(inp: StageInputs, lists: RerankLists, work: Path, timer: StageTimer) -> RerankAdapters:
    """SFT on the training lists' target labels, then DPO continuing the SFT adapter (module text, step 2)."""
    return fit_adapters(inp.model_dir, inp.cfg.rerank, lists.train, work, timer)


def fit_adapters(
    model_dir: Path, rc: RerankSection, train: Sequence[RerankExample], work: Path, timer: StageTimer
) -> RerankAdapters:
    """``train_adapters`` on any lists (the cold-start protocol trains on its own split's)."""
    with timer("rerank_sft"):
        sft = train_sft(model_dir, sft_rows(train), rc.sft, work / "rerank_sft")
    with timer("rerank_dpo"):
        pairs = dpo_rows(train, rc.dpo_rejected, rc.seed)
        dpo = train_dpo(model_dir, pairs, rc.dpo, work / "rerank_dpo", init_adapter=sft.adapter_dir)
    return RerankAdapters(sft, dpo, len(pairs))


def score_lists(
    inp: StageInputs, lists: RerankLists, adapters: RerankAdapters, tokenizer: Any, work: Path
) -> ListScores:
    """One engine job per model (``MODELS``): the calibration lists under cyclic shifts, the scored test and
    cold lists under ``rerank.permutations`` orders; SFT+DPO also scores the validation lists (the fusion weight)."""
    cfg, rc = inp.cfg, inp.cfg.rerank
    orders = shifts(rc.k, rc.permutations)
    calibration_shifts = shifts(rc.k, rc.calibration_shifts or rc.k)
    prompt_cfg = prompt_config(cfg)
    batches = []
    for name in MODELS:
        p = ScoringPrompts(tokenizer, prompt_cfg)
        p.add("calibration", lists.calibration, calibration_shifts)
        p.add("test", _hits(lists.test), orders)
        p.add("cold", _hits(lists.cold), orders)
        if name == "SFT+DPO":
            p.add("valid", _hits(lists.valid), orders)
        batches.append(p)
    weights = (None, adapters.sft.adapter_dir, adapters.dpo.adapter_dir)
    jobs = [
        EngineJob.score(b.prompts, b.label_ids, policy(cfg, inp.model_dir, a, work))
        for b, a in zip(batches, weights, strict=True)
    ]
    raw = run_isolated(engine_jobs, engine_cfg(cfg), jobs)
    return ListScores(
        {name: {g: b.split(r, g) for g in b.slots} for name, b, r in zip(MODELS, batches, raw, strict=True)}
    )


def label_priors(scores: ListScores, rc: RerankSection) -> LabelPriors:
    """Each row's scoring: PriDe's label prior estimated on its model's calibration lists and removed, for the
    zero-shot de-biased row and (``rerank.debias: pride``) the trained rows."""
    debiased = {ZERO_SHOT: False, ZERO_SHOT_DEBIASED: True, SFT: rc.debias == "pride", SFT_DPO: rc.debias == "pride"}
    specs, top_label = {}, {}
    for row, model in ROW_MODELS.items():
        calibration = scores.of(model, "calibration")
        prior = tuple(estimate_prior(calibration).round(6)) if debiased[row] else None
        spec = specs[row] = ScoringSpec(weight=None, log_prior=prior, permutations=rc.permutations)
        # where the top answer falls on the shuffled calibration lists (each shift a list): the label prior
        shown = [item_logprobs([s], [0], spec) for per in calibration for s in per]
        top_label[row] = _label_histogram(shown, rc.k)
    return LabelPriors(specs, top_label)


def choose_fusion(lists: RerankLists, scores: ListScores, priors: LabelPriors, rc: RerankSection) -> FusionChoice:
    """The fusion weight of SFT+DPO, on the validation lists only (``choose_weight``)."""
    valid = _hits(lists.valid)
    orders = shifts(rc.k, rc.permutations)
    valid_scores = [item_logprobs(per, orders, priors.specs[SFT_DPO]) for per in scores.of("SFT+DPO", "valid")]
    weight, curve = choose_weight(valid, valid_scores, rc.fusion_weights)
    log.info(
        "re-rank: fusion weight %g chosen on %d validation lists (NDCG@10 by weight: %s)", weight, len(valid), curve
    )
    return FusionChoice(tuple(rc.fusion_weights), curve, weight)


def _groups(lists: RerankLists, served: Served) -> list[_Group]:
    """The groups the rows are measured on: the test lists, and the cold slice's when it is on."""
    groups = [_Group("test", lists.test, _hits(lists.test), served.ranks, "")]
    if lists.cold_ranks is not None:
        groups.append(_Group("cold", lists.cold, _hits(lists.cold), lists.cold_ranks, COLD))
    return groups


def _item_scores(
    scores: ListScores, priors: LabelPriors, groups: Sequence[_Group], rc: RerankSection
) -> dict[tuple[str, str], list[np.ndarray]]:
    """(row, group) -> per scored list, the (K,) item scores: its model's label log-probs read by the row's
    scoring and averaged over the ``rerank.permutations`` orders."""
    orders = shifts(rc.k, rc.permutations)
    return {
        (row, g.name): [item_logprobs(per, orders, priors.specs[row]) for per in scores.of(model, g.name)]
        for row, model in ROW_MODELS.items()
        for g in groups
    }


def _order_info(llm: dict[tuple[str, str], list[np.ndarray]], test: _Group) -> dict[str, dict[str, float]]:
    """metrics.json "rerank": "order", per row: how its order on the test lists relates to the retriever's."""
    targets = [e.target_position for e in test.scored]
    return {row: order_stats(llm[row, test.name], targets) for row in ROW_MODELS}


def _rerank_rows(
    groups: Sequence[_Group], llm: dict[tuple[str, str], list[np.ndarray]], weight: float
) -> dict[str, np.ndarray]:
    """Test ranks per row: every re-rank row on the full set, then the cold slice's retriever and its rows."""
    ranks: dict[str, np.ndarray] = {}
    for g in groups:
        if g.suffix == COLD:  # the cold slice's retriever row heads its rows
            ranks[COLD_RETRIEVER] = g.base
        for row in ROW_MODELS:
            ranks[row + g.suffix] = _rerank_ranks(g.base, g.every, g.scored, llm[row, g.name])
        fused = [
            fused_scores(np.asarray(e.retriever_scores), s, weight)
            for e, s in zip(g.scored, llm[SFT_DPO, g.name], strict=True)
        ]
        ranks[FUSED + g.suffix] = _rerank_ranks(g.base, g.every, g.scored, fused)
    return ranks


def _rerank_ranks(
    base: np.ndarray, all_lists: Sequence[RerankExample], scored: Sequence[RerankExample], scores: Sequence[np.ndarray]
) -> np.ndarray:
    """``base`` (U,) with each scored list's target moved to its place in the scores' order."""
    index = {e.user_id: i for i, e in enumerate(all_lists)}
    ranks = base.copy()
    for e, s in zip(scored, scores, strict=True):
        ranks[index[e.user_id]] = int(np.flatnonzero(order(s) == e.target_position)[0])
    return ranks
