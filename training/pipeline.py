"""The offline chain into one run directory (SPEC sections 1-6), as a sequence of stages.

data -> leave-one-out split -> most-popular baseline -> SASRec without preferences -> the base
preference row (``training.base_preferences``: the base LLM through vLLM, or the no-LLM control) ->
text encoder -> SASRec with the preferences fused in -> the DPO loop (``training.preference_dpo``, when
``preference_dpo.rounds``: aligned preferences, the served retriever retrained on them) -> the re-rank
stage (``training.rerank_training``, when ``rerank.enabled``) -> FAISS index of the served retriever ->
metrics with bootstrap CIs -> report -> the run directory (``rundir.writer``). Every stage is timed; one
work folder holds what the stages write (adapters, pairs) until the run directory is written.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm.engine import GenerationConfig
from llm.scoring import ScoringSpec
from retrieval.content import ContentTower, fit_text_tower
from retrieval.encoder import EncoderConfig, TextEncoder
from retrieval.index import ItemIndex
from retrieval.sasrec import SASRec
from rundir.spec import LLMSpec
from rundir.writer import RunContents, write_run
from training import ranking_metrics as M
from training.base_preferences import PREFERENCE_ROWS, base_preferences, model_folder
from training.config import PipelineConfig
from training.data import Dataset, prepare_data
from training.preference_dpo import AlignResult, align_preferences
from training.report import write_report
from training.rerank_training import RerankResult, rerank_comparisons, train_reranker
from training.retriever import rank_targets, score_users
from training.split import Split
from training.stages import (
    Served,
    StageInputs,
    StageTimer,
    compare,
    is_selection_user,
    popularity_scores,
    prompt_config,
    ranks_on_test,
    served_histories,
    system_row,
    train_sasrec,
)

log = logging.getLogger(__name__)


@dataclass
class _Base:
    """Every run's first stages: its users, the baseline rows and the base-preference retriever."""

    dataset: Dataset
    split: Split
    users: list[str]
    encoder: TextEncoder
    texts: dict[str, str]  # the base preference text per user
    samples: dict[str, list[str]] | None  # round-1 samples per DPO user, when the base stage drew them
    served: Served  # the base-preference row: texts, vectors, the augmented SASRec, its test ranks
    plain: SASRec  # plain SASRec: what is served unless a preference retriever beats it on the selection users
    ranks: dict[str, np.ndarray]  # test ranks per row: most-popular, SASRec, the base-preference row
    curves: dict[str, list[dict[str, Any]]]  # SASRec validation curves per row


@dataclass
class _LLMStages:
    """What the DPO loop and the re-rank stage made (either may be off in the configuration)."""

    served: Served  # what the run serves: plain SASRec unless the last preference retriever won the selection
    selection: dict[str, Any]  # metrics.json "selection": how ``choose_served`` decided
    aligned: AlignResult | None = None
    reranked: RerankResult | None = None  # trained on the served retriever's lists, so its weight fits them


def run_pipeline(cfg: PipelineConfig, out: Path, overwrite: bool = False, status: Path | None = None) -> dict[str, Any]:
    """Train every stage the configuration enables and write the run directory ``out``; returns metrics.json.
    ``status``: a JSON file kept up to date with the running stage (``training.stages.StageTimer``)."""
    timer = StageTimer(status)
    base = _base_stages(cfg, timer)
    ranks, curves = dict(base.ranks), dict(base.curves)
    comparisons = [
        c
        for a, b in ((base.served.row, "SASRec"), ("SASRec", "most-popular"))
        for c in compare(_per_user(ranks), a, b, ("NDCG@10", "Recall@10"), cfg.eval.bootstrap)
    ]
    work = Path(tempfile.mkdtemp(prefix="dpo4rec-train-"))  # adapters and pairs, until the run is written
    try:
        llm = _llm_stages(cfg, base, work, timer)
        served = llm.served
        doc: dict[str, Any] = {"selection": llm.selection}
        if llm.aligned:
            ranks.update(llm.aligned.ranks)
            curves.update(llm.aligned.curves)
            comparisons += llm.aligned.comparisons
            _merge_doc(doc, llm.aligned.doc)
        if llm.reranked:
            ranks.update(llm.reranked.ranks)
            comparisons += rerank_comparisons(_per_user(ranks), llm.served.row, cfg.eval.bootstrap)  # its lists
            _merge_doc(doc, llm.reranked.doc)
        with timer("index"):
            index = ItemIndex(served.retriever.item_vectors(), kind=cfg.eval.index_kind)
            test_seqs = _test_sequences(base.split, base.users)
            prefs = served.vectors if served.retriever.cfg.pref_dim else None  # plain SASRec reads no preference
            queries = served.retriever.user_vectors([test_seqs[u] for u in base.users], prefs)
            index_recall = index.recall_vs_exact(queries, k=20)
        with timer("content_tower"):
            content = fit_content_tower(base, served.retriever.item_vectors())
        rows = [system_row(name, r) for name, r in ranks.items()]
        metrics_doc = {
            "split": "test",
            "users": len(base.users),
            "rows": rows,
            "comparisons": comparisons,
            "index_recall_at_20_vs_exact": index_recall,
            "content_tower": {"alpha": content.alpha, "holdout_r2": content.holdout_r2},
            "stage_seconds": timer.seconds,
            "curves": curves,
        }
        metrics_doc.update({"served_retriever": served.row, **doc})  # + reward, DPO curves, re-rank details
        version = _write(cfg, out, base, llm, index, content, metrics_doc, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("run written to %s (version %s)", out, version)
    return metrics_doc


def _base_stages(cfg: PipelineConfig, timer: StageTimer) -> _Base:
    """data -> split -> most-popular -> SASRec -> base preference texts -> their vectors -> SASRec with them."""
    with timer("data"):
        data = prepare_data(cfg)
    dataset, split, users, catalog = data.dataset, data.split, data.users, data.dataset.catalog
    test_seqs = _test_sequences(split, users)
    ranks: dict[str, np.ndarray] = {}
    with timer("most_popular"):
        pop = popularity_scores(catalog, test_seqs)
        ranks["most-popular"] = ranks_on_test(np.tile(pop, (len(users), 1)), split, users)
    with timer("sasrec"):
        plain, plain_curve = train_sasrec(cfg, catalog, split, users, None, 0)
        ranks["SASRec"] = ranks_on_test(score_users(plain, test_seqs, None, users), split, users)
    pref_row = PREFERENCE_ROWS[cfg.llm.preference_source]
    with timer("preferences_llm"):
        texts, samples = base_preferences(cfg, catalog, split, users)
    with timer("preferences_encode"):
        encoder = TextEncoder(EncoderConfig())
        vectors = encoder.encode([texts[u] for u in users], progress=True)
        prefs = {u: vectors[i] for i, u in enumerate(users)}
    with timer("sasrec_pref"):
        augmented, aug_curve = train_sasrec(cfg, catalog, split, users, prefs, vectors.shape[1])
        ranks[pref_row] = ranks_on_test(score_users(augmented, test_seqs, prefs, users), split, users)
    served = Served(pref_row, texts, vectors, augmented, ranks[pref_row])
    curves = {"SASRec": plain_curve, pref_row: aug_curve}
    return _Base(dataset, split, users, encoder, texts, samples, served, plain, ranks, curves)


def _llm_stages(cfg: PipelineConfig, base: _Base, work: Path, timer: StageTimer) -> _LLMStages:
    """The DPO loop on the base preferences, the choice of what is served (``choose_served``), then the re-rank
    stage on the served retriever's lists."""
    if not (cfg.preference_dpo.rounds or cfg.rerank.enabled):
        return _LLMStages(*choose_served(cfg, base, base.served, base.ranks))
    from transformers import AutoTokenizer  # heavy; a run without LLM stages does not pay for it

    model_dir = model_folder(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    s = base.served
    inp = StageInputs(
        cfg, base.dataset.catalog, base.split, base.users, model_dir, base.encoder, base.texts, s.vectors,
        s.retriever, s.ranks, base.samples,
    )  # fmt: skip
    aligned = align_preferences(inp, tokenizer, work, timer) if cfg.preference_dpo.rounds else None
    # chosen before the re-rank job: its lists, and the fusion weight chosen on them, come from what is served
    served, selection = choose_served(cfg, base, aligned.served if aligned else s, base.ranks)
    reranked = train_reranker(inp, served, tokenizer, work, timer) if cfg.rerank.enabled else None
    return _LLMStages(served, selection, aligned, reranked)


def _write(
    cfg: PipelineConfig,
    out: Path,
    base: _Base,
    llm: _LLMStages,
    index: ItemIndex,
    content: ContentTower,
    metrics_doc: dict[str, Any],
    overwrite: bool,
) -> str:
    """The run directory (``rundir.writer``) with llm.json, the report and the manifest; returns its version."""
    aligned, reranked, served, users = llm.aligned, llm.reranked, llm.served, base.users
    # without a re-rank stage nothing measured the LLM's order: serve the retriever's (weight 0, no engine call;
    # runs written before this served the raw LLM order, which reads the label prior: docs/RESULTS.md)
    scoring = reranked.scoring if reranked else ScoringSpec(weight=0.0)
    spec = LLMSpec(
        base_model=cfg.llm.model,
        adapters={
            "preference": aligned.adapter if aligned else None,
            "rerank": reranked.adapter if reranked else None,
        },
        prompt=prompt_config(cfg),
        rerank_k=cfg.rerank.k,
        preference_generation=GenerationConfig(
            max_tokens=cfg.llm.max_tokens,
            temperature=cfg.llm.temperature,
            repetition_penalty=cfg.llm.repetition_penalty,
        ),
        scoring=scoring,
    )
    examples = {u: base.texts[u] for u in users[:3]}
    if aligned and served.texts is not base.texts:
        examples.update({f"{u} (DPO-aligned)": served.texts[u] for u in users[:3]})
    dataset = base.dataset
    version = f"{dataset.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    llm_rerank = ("on" if scoring.uses_llm else "skipped (fusion weight 0)") if reranked else "not trained (weight 0)"
    rows = metrics_doc["rows"]
    write_run(
        out,
        RunContents(
            catalog=dataset.catalog,
            retriever=served.retriever,
            encoder=base.encoder.cfg,
            index=index,
            texts={u: served.texts[u] for u in users},
            vectors=served.vectors,
            users=served_histories(base.split, users),
            llm=spec,
            metrics=metrics_doc,
            files=aligned.files if aligned else {},
            content=content,
        ),
        version=version,
        dataset=dataset.name,
        config=cfg.to_dict(),
        headline={r["system"]: {"NDCG@10": r["NDCG@10"], "Recall@10": r["Recall@10"]} for r in rows},
        extra={"llm_rerank": llm_rerank, "fusion_weight": scoring.weight, "slice_weights": scoring.slice_weights},
        report=lambda folder: write_report(folder, metrics_doc, examples=examples),
        overwrite=overwrite,
    )
    return version


def fit_content_tower(base: _Base, item_vectors: np.ndarray) -> ContentTower:
    """The content tower (``retrieval.content``) fit on the warm items: those in some user's training items,
    their served retriever vectors (N+1, H) the targets, their text through the run's sentence encoder."""
    warm = sorted({i for u in base.users for i in base.split.users[u].train})
    tower = fit_text_tower(base.encoder, base.dataset.catalog, warm, item_vectors)
    log.info("content tower on %d warm items: alpha %g, held-out R^2 %.3f", len(warm), tower.alpha, tower.holdout_r2)
    return tower


def choose_served(
    cfg: PipelineConfig, base: _Base, candidate: Served, ranks: dict[str, np.ndarray]
) -> tuple[Served, dict[str, Any]]:
    """Plain SASRec, unless the preference retriever the stages ended with beats it on the selection users'
    validation items (never seen by early stopping: ``eval.select_share``) with a paired bootstrap CI above 0.
    Early stopping picks the best of ~30 noisy evaluations, so the validation items it saw favour the model
    with more variance; these did not take part."""
    share = cfg.eval.select_share
    users = [u for u in base.users if is_selection_user(u, share)]
    if not users:
        return candidate, {"select_share": share, "served": candidate.row, "why": "no selection users"}
    seqs = {u: base.split.users[u].train for u in users}
    valid = {u: base.split.users[u].valid for u in users}
    rows = {u: i for i, u in enumerate(base.users)}
    prefs = {u: candidate.vectors[rows[u]] for u in users}
    plain = M.per_user(rank_targets(base.plain, seqs, valid, None, users))["NDCG@10"]
    pref = M.per_user(rank_targets(candidate.retriever, seqs, valid, prefs, users))["NDCG@10"]
    diff = M.bootstrap_diff(pref, plain, n_boot=cfg.eval.bootstrap)
    keep = diff["ci_low"] > 0
    served = candidate if keep else Served("SASRec", candidate.texts, candidate.vectors, base.plain, ranks["SASRec"])
    log.info(
        "served retriever: %s (%s vs SASRec on %d selection users' validation NDCG@10: %+.4f [%+.4f, %+.4f])",
        served.row, candidate.row, len(users), diff["diff"], diff["ci_low"], diff["ci_high"],
    )  # fmt: skip
    return served, {"select_share": share, "users": len(users), "candidate": candidate.row, "vs_plain": diff,
                    "served": served.row}  # fmt: skip


def _test_sequences(split: Split, users: list[str]) -> dict[str, list[int]]:
    """What the retriever sees when it ranks a user's test item: the training items and the validation item."""
    return {u: [*split.users[u].train, split.users[u].valid] for u in users}


def _per_user(ranks: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    return {name: M.per_user(r) for name, r in ranks.items()}


def _merge_doc(doc: dict[str, Any], more: dict[str, Any]) -> None:
    """metrics.json additions of a stage; ``dpo_curves`` from both stages go into one mapping."""
    for key, value in more.items():
        if key == "dpo_curves":
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
