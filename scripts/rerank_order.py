"""Does a run's re-ranker follow the retriever's order, or find the true item? And what did it train on?

Rebuilds the re-rank job's test prompts from a run directory (its served retriever, preference texts and
K), scores them with the base LLM (zero-shot) and with the run's re-rank adapter (SFT+DPO; the SFT-only
adapter is not kept in a run), and prints ``training.rerank.order_stats`` for both. Also rebuilds the
training examples as ``rerank.insert_target`` true and false would, and prints where their true label
sits and how often the DPO rejected label is the retriever's top (label A).

    python -m scripts.rerank_order runs/small2 --config small   # from the repo root
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import typer
from transformers import AutoTokenizer

from llm.labels import candidate_labels
from llm.models import resolve_model
from llm.prompts import render
from retrieval.sasrec import SASRec
from training.config import load_config
from training.data import load_dataset
from training.loop import engine_cfg, engine_jobs, sample_users
from training.pipeline import prompt_config, run_isolated
from training.preferences import load_preferences
from training.rerank import build_examples, order_stats, retrieve
from training.split import leave_one_out

app = typer.Typer(add_completion=False)


@app.command()
def main(
    run: Path = typer.Argument(..., help="a run directory written by `dpo4rec train` with the re-rank job on"),
    config: str = typer.Option("small", help="the configuration the run was trained with"),
) -> None:
    from training.dpo import merge_adapter

    cfg = load_config(config)
    rc = cfg.rerank
    dataset = load_dataset(cfg.data.name, Path(cfg.data.data_dir))
    split = leave_one_out(dataset.interactions, cfg.data.min_interactions)
    users = split.ids()[: cfg.max_users] if cfg.max_users else split.ids()
    texts, vectors = load_preferences(run)
    prefs = {u: vectors[i] for i, u in enumerate(texts)}
    retriever = SASRec.load(run / "retriever")
    model_dir = resolve_model(cfg.llm.model, Path(cfg.llm.model_cache).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = candidate_labels(tokenizer, rc.k)
    prompt_cfg = prompt_config(cfg)

    # training examples: where does the true label sit, and what is the DPO rejected label?
    train_seqs = {u: split.users[u].train for u in users}
    ranked = retrieve(retriever, train_seqs, prefs, users, rc.k)
    valid = {u: split.users[u].valid for u in users}
    hits = [u for u in users if valid[u] in ranked[u]]
    for name, pool in (("insert_target=true", users), ("insert_target=false", hits or users)):
        chosen = sample_users(pool, rc.train_users, rc.seed)
        train = build_examples(
            dataset.catalog, chosen, train_seqs, valid, ranked, texts, labels, prompt_cfg, insert_target=True
        )
        positions = np.array([e.target_position for e in train]) + 1
        rejected_a = np.mean([e.negative_position == 0 for e in train])
        print(
            f"training, {name}: {len(train)} examples, {sum(e.inserted for e in train)} inserted; true label's "
            f"mean position {positions.mean():.2f} (1 = A); DPO rejected label is A in {rejected_a:.0%}"
        )

    # test prompts: only users whose test item is among the K can move
    test_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in users}
    ranked = retrieve(retriever, test_seqs, prefs, users, rc.k)
    test = build_examples(
        dataset.catalog,
        users,
        test_seqs,
        {u: split.users[u].test for u in users},
        ranked,
        texts,
        labels,
        prompt_cfg,
        insert_target=False,
    )
    scored = [e for e in test if e.target_position is not None]
    prompts = [render(tokenizer, e.messages) for e in scored]
    ids = [[token for _, token in e.labels] for e in scored]
    llm = json.loads((run / "llm.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [{"kind": "score", "prompts": prompts, "label_ids": ids, "model": str(model_dir), "lora": None}]
        if llm["adapters"].get("rerank"):
            merged = merge_adapter(model_dir, run / llm["adapters"]["rerank"], Path(tmp) / "merged", dtype="float32")
            jobs.append({"kind": "score", "prompts": prompts, "label_ids": ids, "model": str(merged), "lora": None})
        scores = run_isolated(engine_jobs, engine_cfg(cfg), jobs)
    targets = [e.target_position for e in scored]
    for name, per_prompt in zip(("zero-shot", "the run's re-rank adapter (SFT+DPO)"), scores, strict=False):
        print(f"test, {name}: {json.dumps({k: round(v, 4) for k, v in order_stats(per_prompt, targets).items()})}")


if __name__ == "__main__":
    app()
