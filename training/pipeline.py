"""The offline chain into one run directory (SPEC sections 1-6).

data -> leave-one-out split -> most-popular baseline -> SASRec without preferences -> LLM preference
inference (vLLM) -> text encoder -> SASRec with the preferences fused in -> (when enabled, training/loop.py:
the DPO loop, which retrains the served retriever on aligned preferences, and the re-rank job) -> FAISS
index of the served retriever -> metrics with bootstrap CIs -> report -> manifest. Every stage is timed;
the run directory is staged in a temp folder and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm.prompts import PromptConfig
from retrieval.catalog import Catalog
from retrieval.encoder import EncoderConfig, TextEncoder
from retrieval.index import ItemIndex
from rundir.manifest import RunDirError, read_manifest, staging_dir, write_manifest
from retrieval.sasrec import SASRec, SASRecConfig
from training import metrics as M
from training.config import PipelineConfig
from training.data import Dataset, load_dataset
from training.preferences import history_texts, load_preferences, preference_prompts, save_preferences
from training.report import write_report
from training.retriever import RetrieverTrainConfig, score_users, train_retriever
from training.split import Split, leave_one_out

log = logging.getLogger(__name__)

# the row of the SASRec with preference texts, by llm.preference_source
PREFERENCE_ROWS = {"llm": "SASRec + base-LLM preferences", "history": "SASRec + history text (no LLM)"}


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


def popularity_scores(catalog: Catalog, sequences: dict[str, list[int]]) -> np.ndarray:
    """(N+1,) interaction counts over the given sequences; the most-popular baseline's scores."""
    counts = np.zeros(catalog.num_embeddings, dtype=np.float64)
    for items in sequences.values():
        np.add.at(counts, np.asarray(items, dtype=np.int64), 1.0)
    return counts


def ranks_on_test(scores: np.ndarray, split: Split, users: list[str]) -> np.ndarray:
    """Test-item ranks; the user has already seen training and validation items."""
    targets = np.array([split.users[u].test for u in users])
    exclude = [[*split.users[u].train, split.users[u].valid] for u in users]
    return M.ranks_of_targets(scores, targets, exclude)


def _train_sasrec(
    cfg: PipelineConfig,
    catalog: Catalog,
    split: Split,
    users: list[str],
    prefs: dict[str, np.ndarray] | None,
    pref_dim: int,
) -> tuple[SASRec, list[dict[str, Any]]]:
    r = cfg.retriever
    model_cfg = SASRecConfig(
        num_items=len(catalog),
        max_len=r.max_len,
        hidden=r.hidden,
        layers=r.layers,
        heads=r.heads,
        dropout=r.dropout,
        pref_dim=pref_dim,
        fusion=r.fusion,
        adaptor_hidden=r.adaptor_hidden,
    )
    train_cfg = RetrieverTrainConfig(
        epochs=r.epochs,
        batch_size=r.batch_size,
        lr=r.lr,
        weight_decay=r.weight_decay,
        patience=r.patience,
        seed=r.seed,
        max_len=r.max_len,
        windows=r.windows,
        num_threads=r.num_threads,
    )
    train_seqs = {u: split.users[u].train for u in users}
    valid = {u: split.users[u].valid for u in users}
    described = None  # the items each preference text was written from (the prompt's newest items)
    if prefs is not None and r.mask_described:
        described = {u: train_seqs[u][-cfg.llm.history_items :] for u in users}
    return train_retriever(train_cfg, model_cfg, train_seqs, valid, prefs, progress=True, described=described)


def _served_histories(split: Split, users: list[str]) -> dict[str, list[int]]:
    return {u: [*split.users[u].train, split.users[u].valid, split.users[u].test] for u in users}


def prompt_histories(split: Split, users: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """What a preference prompt may see: the training part of each history, never valid or test."""
    return {u: (split.users[u].train, split.users[u].train_ratings) for u in users}


def _generate_in_subprocess(engine_cfg: dict[str, Any], gen_cfg: dict[str, Any], prompts: list[str]) -> list[str]:
    """Runs in a spawned process: the vLLM engine, its threads and its memory all end with it."""
    from llm.engine import EngineConfig, GenerationConfig, generate, make_llm, shutdown_llm

    engine = make_llm(EngineConfig(**engine_cfg))
    try:
        outputs = generate(engine, prompts, GenerationConfig(**gen_cfg), progress=True)
    finally:
        shutdown_llm(engine)
    return [texts[0].strip() for texts in outputs]


def run_isolated(fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` in a fresh spawned process. A vLLM engine left in the training process keeps
    worker threads spinning and slowed SASRec training about 20x on this 2-core machine."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def infer_preferences(cfg: PipelineConfig, catalog: Catalog, split: Split, users: list[str]) -> dict[str, str]:
    """One preference text per user from the training part of the history, through vLLM."""
    from transformers import AutoTokenizer

    from llm.models import resolve_model

    model_dir = resolve_model(cfg.llm.model, Path(cfg.llm.model_cache).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = preference_prompts(
        tokenizer, catalog, prompt_histories(split, users), PromptConfig(max_history=cfg.llm.history_items)
    )
    engine_cfg = {
        "model": str(model_dir),
        "max_model_len": cfg.llm.max_model_len,
        "max_num_seqs": cfg.llm.max_num_seqs,
        "seed": cfg.llm.seed,
    }
    gen_cfg = {
        "n": 1,
        "temperature": cfg.llm.temperature,
        "max_tokens": cfg.llm.max_tokens,
        "seed": cfg.llm.seed,
        "repetition_penalty": cfg.llm.repetition_penalty,
    }
    texts = run_isolated(_generate_in_subprocess, engine_cfg, gen_cfg, list(prompts.values()))
    return dict(zip(prompts, texts, strict=True))


def reuse_preferences(run: Path, users: list[str]) -> dict[str, str]:
    """The preference texts of an earlier training run, for the same users (checked)."""
    manifest = read_manifest(run)
    if manifest.get("preferences_refreshed"):
        raise RunDirError(
            f"{run}: its preferences were refreshed from full histories (dpo4rec preferences), which include "
            "the validation and test items; reuse the texts of a training run instead"
        )
    texts, _ = load_preferences(run)
    missing = [u for u in users if u not in texts]
    if missing:
        raise RunDirError(f"{run / 'preferences.jsonl'} has no text for {len(missing)} users, e.g. {missing[:5]}")
    log.info("reusing %d preference texts from %s", len(users), run)
    return {u: texts[u] for u in users}


def _row(name: str, ranks: np.ndarray) -> dict[str, Any]:
    return {"system": name, **M.summarize(ranks), "users": int(len(ranks))}


def prompt_config(cfg: PipelineConfig) -> PromptConfig:
    """Both jobs' prompt settings, saved in llm.json so the service builds the prompts training saw."""
    return PromptConfig(
        max_history=cfg.llm.history_items,
        max_recent=cfg.rerank.recent_items,
        max_preference_chars=cfg.rerank.preference_chars,
    )


def _base_preferences_and_samples(
    cfg: PipelineConfig, catalog: Catalog, split: Split, users: list[str]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """infer_preferences plus the DPO loop's round-1 samples, one engine (training.loop)."""
    from llm.models import resolve_model
    from training.loop import base_preferences_and_samples

    model_dir = resolve_model(cfg.llm.model, Path(cfg.llm.model_cache).expanduser())
    return base_preferences_and_samples(cfg, catalog, split, users, model_dir)


def _run_loop(
    cfg: PipelineConfig,
    catalog: Catalog,
    split: Split,
    users: list[str],
    encoder: TextEncoder,
    texts: dict[str, str],
    vectors: np.ndarray,
    augmented: SASRec,
    base_ranks: np.ndarray,
    samples: dict[str, list[str]] | None,
    timer: StageTimer,
) -> Any:
    """training.loop.run_loop on the pipeline's state (imported here: loop.py imports this module)."""
    from llm.models import resolve_model
    from training.loop import LoopInputs, run_loop

    model_dir = resolve_model(cfg.llm.model, Path(cfg.llm.model_cache).expanduser())
    return run_loop(
        LoopInputs(
            cfg=cfg,
            catalog=catalog,
            split=split,
            users=users,
            model_dir=model_dir,
            encoder=encoder,
            texts=texts,
            vectors=vectors,
            retriever=augmented,
            ranks=base_ranks,
            samples=samples,
        ),
        timer,
    )


def run_pipeline(cfg: PipelineConfig, out: Path, overwrite: bool = False) -> dict[str, Any]:
    timer = StageTimer()
    with timer("data"):
        dataset: Dataset = load_dataset(cfg.data.name, Path(cfg.data.data_dir))
        split = leave_one_out(dataset.interactions, cfg.data.min_interactions)
        users = split.ids()[: cfg.max_users] if cfg.max_users else split.ids()
        catalog = dataset.catalog
    ranks: dict[str, np.ndarray] = {}
    with timer("most_popular"):
        seen = {u: [*split.users[u].train, split.users[u].valid] for u in users}
        pop = popularity_scores(catalog, seen)
        ranks["most-popular"] = ranks_on_test(np.tile(pop, (len(users), 1)), split, users)
    test_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in users}
    with timer("sasrec"):
        plain, plain_curve = _train_sasrec(cfg, catalog, split, users, None, 0)
        ranks["SASRec"] = ranks_on_test(score_users(plain, test_seqs, None, users), split, users)
    samples = None  # with the DPO loop on, its round-1 samples come from the same engine (one start less)
    pref_row = PREFERENCE_ROWS[cfg.llm.preference_source]
    with timer("preferences_llm"):
        if cfg.llm.preference_source == "history":
            texts = history_texts(catalog, prompt_histories(split, users), prompt_config(cfg))
        elif cfg.llm.preferences_from:
            texts = reuse_preferences(Path(cfg.llm.preferences_from), users)
        elif cfg.preference_dpo.rounds:
            texts, samples = _base_preferences_and_samples(cfg, catalog, split, users)
        else:
            texts = infer_preferences(cfg, catalog, split, users)
    with timer("preferences_encode"):
        encoder_cfg = EncoderConfig()
        encoder = TextEncoder(encoder_cfg)
        vectors = encoder.encode([texts[u] for u in users], progress=True)
        prefs = {u: vectors[i] for i, u in enumerate(users)}
    with timer("sasrec_pref"):
        augmented, aug_curve = _train_sasrec(cfg, catalog, split, users, prefs, vectors.shape[1])
        aug_scores = score_users(augmented, test_seqs, prefs, users)
        ranks[pref_row] = ranks_on_test(aug_scores, split, users)
    loop = None  # the DPO loop and the re-rank job (training/loop.py), only when the config enables them
    if cfg.preference_dpo.rounds or cfg.rerank.enabled:
        loop = _run_loop(
            cfg,
            catalog,
            split,
            users,
            encoder,
            texts,
            vectors,
            augmented,
            ranks[pref_row],
            samples,
            timer,
        )
        ranks.update(loop.ranks)
    served_texts = loop.texts if loop else texts
    served_vectors = loop.vectors if loop else vectors
    served = loop.retriever if loop else augmented
    with timer("index"):
        index = ItemIndex(served.item_vectors(), kind=cfg.eval.index_kind)
        queries = served.user_vectors([test_seqs[u] for u in users], served_vectors)
        index_recall = index.recall_vs_exact(queries, k=20)
    rows = [_row(name, r) for name, r in ranks.items()]
    per_user = {name: M.per_user(r) for name, r in ranks.items()}
    comparisons = [
        {"a": a, "b": b, "metric": m, **M.bootstrap_diff(per_user[a][m], per_user[b][m], n_boot=cfg.eval.bootstrap)}
        for a, b in ((pref_row, "SASRec"), ("SASRec", "most-popular"))
        for m in ("NDCG@10", "Recall@10")
    ] + (loop.comparisons if loop else [])
    version = f"{dataset.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    metrics_doc = {
        "split": "test",
        "users": len(users),
        "rows": rows,
        "comparisons": comparisons,
        "index_recall_at_20_vs_exact": index_recall,
        "stage_seconds": timer.seconds,
        "curves": {"SASRec": plain_curve, pref_row: aug_curve, **(loop.curves if loop else {})},
    }
    if loop:  # the retriever the run serves, reward distributions, DPO curves, loop and re-rank details
        metrics_doc.update({"served_retriever": loop.served_row, **loop.doc})
    with staging_dir(Path(out), overwrite=overwrite) as tmp:
        catalog.save(tmp / "catalog.jsonl")
        served.save(tmp / "retriever")
        (tmp / "encoder.json").write_text(json.dumps(asdict(encoder_cfg)))
        index.save(tmp / "index.faiss")
        save_preferences(tmp, {u: served_texts[u] for u in users}, served_vectors)
        (tmp / "users.json").write_text(json.dumps(_served_histories(split, users)))
        for rel, content in (loop.files if loop else {}).items():  # adapters/preference, adapters/rerank, dpo/
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(content)
        (tmp / "llm.json").write_text(
            json.dumps(
                {
                    "base_model": cfg.llm.model,
                    "adapters": loop.adapters if loop else {"preference": None, "rerank": None},
                    "prompt": asdict(prompt_config(cfg)),
                    "rerank_k": cfg.rerank.k,
                    # how the service turns label log-probs into served scores (llm.scoring), when the re-rank
                    # job chose it; null: an LLM-only order (no re-rank adapter trained)
                    "scoring": asdict(loop.scoring) if loop and loop.scoring else None,
                    "preference_generation": {
                        "max_tokens": cfg.llm.max_tokens,
                        "temperature": cfg.llm.temperature,
                        "repetition_penalty": cfg.llm.repetition_penalty,
                    },
                },
                indent=2,
            )
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics_doc, indent=2))
        examples = {u: texts[u] for u in users[:3]}
        if loop and served_texts is not texts:
            examples.update({f"{u} (DPO-aligned)": served_texts[u] for u in users[:3]})
        write_report(tmp, metrics_doc, examples=examples)
        headline = {r["system"]: {"NDCG@10": r["NDCG@10"], "Recall@10": r["Recall@10"]} for r in rows}
        scoring = loop.scoring if loop else None
        llm_rerank = "not trained" if scoring is None else ("on" if scoring.uses_llm else "skipped (fusion weight 0)")
        write_manifest(
            tmp,
            version=version,
            dataset=dataset.name,
            config=cfg.to_dict(),
            metrics=headline,
            extra={"llm_rerank": llm_rerank, "fusion_weight": scoring.weight if scoring else None},
        )
    log.info("run written to %s (version %s)", out, version)
    return metrics_doc
