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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm.engine import GenerationConfig
from retrieval.encoder import EncoderConfig, TextEncoder
from retrieval.index import ItemIndex
from rundir.spec import LLMSpec
from rundir.writer import RunContents, write_run
from training import ranking_metrics as M
from training.base_preferences import PREFERENCE_ROWS, base_preferences, model_folder
from training.config import PipelineConfig
from training.data import load_dataset
from training.preference_dpo import AlignResult, align_preferences
from training.report import write_report
from training.rerank_training import RerankResult, rerank_comparisons, train_reranker
from training.retriever import score_users
from training.split import leave_one_out
from training.stages import (
    Served,
    StageInputs,
    StageTimer,
    compare,
    popularity_scores,
    prompt_config,
    ranks_on_test,
    served_histories,
    system_row,
    train_sasrec,
)

log = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Train every stage the configuration enables and write the run directory ``out``; returns metrics.json."""
    timer = StageTimer()
    with timer("data"):
        dataset = load_dataset(cfg.data.name, Path(cfg.data.data_dir))
        split = leave_one_out(dataset.interactions, cfg.data.min_interactions)
        users = split.ids()[: cfg.max_users] if cfg.max_users else split.ids()
        catalog = dataset.catalog
    test_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in users}
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
        encoder_cfg = EncoderConfig()
        encoder = TextEncoder(encoder_cfg)
        vectors = encoder.encode([texts[u] for u in users], progress=True)
        prefs = {u: vectors[i] for i, u in enumerate(users)}
    with timer("sasrec_pref"):
        augmented, aug_curve = train_sasrec(cfg, catalog, split, users, prefs, vectors.shape[1])
        ranks[pref_row] = ranks_on_test(score_users(augmented, test_seqs, prefs, users), split, users)
    curves = {"SASRec": plain_curve, pref_row: aug_curve}
    served = Served(pref_row, texts, vectors, augmented, ranks[pref_row])
    per_user = {name: M.per_user(r) for name, r in ranks.items()}
    comparisons = [
        c
        for a, b in ((pref_row, "SASRec"), ("SASRec", "most-popular"))
        for c in compare(per_user, a, b, ("NDCG@10", "Recall@10"), cfg.eval.bootstrap)
    ]
    doc: dict[str, Any] = {}
    aligned: AlignResult | None = None
    reranked: RerankResult | None = None
    work = Path(tempfile.mkdtemp(prefix="dpo4rec-train-"))  # adapters and pairs, until the run is written
    try:
        if cfg.preference_dpo.rounds or cfg.rerank.enabled:
            from transformers import AutoTokenizer

            model_dir = model_folder(cfg)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            inp = StageInputs(
                cfg, catalog, split, users, model_dir, encoder, texts, vectors, augmented, ranks[pref_row], samples
            )
            if cfg.preference_dpo.rounds:
                aligned = align_preferences(inp, tokenizer, work, timer)
                served = aligned.served
                ranks.update(aligned.ranks)
                curves.update(aligned.curves)
                comparisons += aligned.comparisons
                _merge_doc(doc, aligned.doc)
            if cfg.rerank.enabled:
                reranked = train_reranker(inp, served, tokenizer, work, timer)
                ranks.update(reranked.ranks)
                per_user = {name: M.per_user(r) for name, r in ranks.items()}
                comparisons += rerank_comparisons(per_user, served.row, cfg.eval.bootstrap)
                _merge_doc(doc, reranked.doc)
        with timer("index"):
            index = ItemIndex(served.retriever.item_vectors(), kind=cfg.eval.index_kind)
            queries = served.retriever.user_vectors([test_seqs[u] for u in users], served.vectors)
            index_recall = index.recall_vs_exact(queries, k=20)
        rows = [system_row(name, r) for name, r in ranks.items()]
        metrics_doc = {
            "split": "test",
            "users": len(users),
            "rows": rows,
            "comparisons": comparisons,
            "index_recall_at_20_vs_exact": index_recall,
            "stage_seconds": timer.seconds,
            "curves": curves,
        }
        if aligned or reranked:  # the retriever the run serves, reward distributions, DPO curves, re-rank details
            metrics_doc.update({"served_retriever": served.row, **doc})
        scoring = reranked.scoring if reranked else None
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
            **({"scoring": scoring} if scoring else {}),  # none: an LLM-only order (no re-rank adapter trained)
        )
        examples = {u: texts[u] for u in users[:3]}
        if aligned and served.texts is not texts:
            examples.update({f"{u} (DPO-aligned)": served.texts[u] for u in users[:3]})
        version = f"{dataset.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        llm_rerank = "not trained" if scoring is None else ("on" if scoring.uses_llm else "skipped (fusion weight 0)")
        write_run(
            out,
            RunContents(
                catalog=catalog,
                retriever=served.retriever,
                encoder=encoder_cfg,
                index=index,
                texts={u: served.texts[u] for u in users},
                vectors=served.vectors,
                users=served_histories(split, users),
                llm=spec,
                metrics=metrics_doc,
                files=aligned.files if aligned else {},
            ),
            version=version,
            dataset=dataset.name,
            config=cfg.to_dict(),
            headline={r["system"]: {"NDCG@10": r["NDCG@10"], "Recall@10": r["Recall@10"]} for r in rows},
            extra={"llm_rerank": llm_rerank, "fusion_weight": scoring.weight if scoring else None},
            report=lambda folder: write_report(folder, metrics_doc, examples=examples),
            overwrite=overwrite,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("run written to %s (version %s)", out, version)
    return metrics_doc


def _merge_doc(doc: dict[str, Any], more: dict[str, Any]) -> None:
    """metrics.json additions of a stage; ``dpo_curves`` from both stages go into one mapping."""
    for key, value in more.items():
        if key == "dpo_curves":
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
