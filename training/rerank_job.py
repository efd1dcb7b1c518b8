"""The re-rank job of the DPO loop (SPEC section 1; LlamaRec's verbalizer, Yue et al., arXiv 2311.02089).

The served retriever's top K on the test step, scored in one forward pass per prompt from the label
log-probabilities: zero-shot, after SFT on the validation step's true label, and after DPO continuing the
SFT adapter (chosen = the true label, rejected = the retriever's highest-ranked wrong candidate; one
rerank adapter on the base model). Candidates outside the top K keep the retriever's order below the
re-ranked ones, so a user whose test item is not among the K keeps the retriever's rank whatever the LLM
says: only the other users' prompts are scored (the same metric, a fraction of the work). Training
examples predict the validation item from the training sequence; a missed target is inserted at a seeded
slot (``rerank.insert_target``). The prompts show no ratings, as the service's do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llm.labels import candidate_labels
from llm.prompts import render
from training.dpo import train_dpo, train_sft
from training.loop import (
    BASE_ROW,
    RERANK_ROWS,
    LoopInputs,
    LoopOutputs,
    curve_json,
    engine_cfg,
    engine_jobs,
    policy,
    read_tree,
    sample_users,
    train_summary,
)
from training.pipeline import StageTimer, prompt_config, run_isolated
from training.rerank import RerankExample, build_examples, dpo_rows, order_stats, rerank_order, retrieve, sft_rows

log = logging.getLogger(__name__)


def rerank_examples(
    inp: LoopInputs, tokenizer: Any, out: LoopOutputs
) -> tuple[list[RerankExample], list[RerankExample]]:
    """(test examples of every user, validation-step training examples of the sampled training users)."""
    cfg, split, rc = inp.cfg, inp.split, inp.cfg.rerank
    labels = candidate_labels(tokenizer, rc.k)
    prompt_cfg = prompt_config(cfg)
    assert out.vectors is not None and out.retriever is not None
    prefs = {u: out.vectors[i] for i, u in enumerate(inp.users)}
    test_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in inp.users}
    ranked = retrieve(out.retriever, test_seqs, prefs, inp.users, rc.k)
    test = build_examples(
        inp.catalog,
        inp.users,
        test_seqs,
        {u: split.users[u].test for u in inp.users},
        ranked,
        out.texts,
        labels,
        prompt_cfg,
        ratings=None,
        insert_target=False,
    )
    if rc.insert_target:  # a missed validation item is put among the K at a seeded slot
        train_users = sample_users(inp.users, rc.train_users, rc.seed)
        train_seqs = {u: split.users[u].train for u in train_users}
        ranked = retrieve(out.retriever, train_seqs, prefs, train_users, rc.k)
    else:  # only users whose validation item the retriever put among the K: what the scored prompts look like
        train_seqs = {u: split.users[u].train for u in inp.users}
        ranked = retrieve(out.retriever, train_seqs, prefs, inp.users, rc.k)
        hits = [u for u in inp.users if split.users[u].valid in ranked[u]]
        if not hits:  # nothing to train on in the scored prompts' shape; say so rather than stop the run
            log.warning("re-rank: no validation item is in the top %d; training on inserted targets", rc.k)
        train_users = sample_users(hits or inp.users, rc.train_users, rc.seed)
        log.info(
            "re-rank training: %d users sampled from the %d whose validation item is in the top %d",
            len(train_users),
            len(hits),
            rc.k,
        )
    train = build_examples(
        inp.catalog,
        train_users,
        train_seqs,
        {u: split.users[u].valid for u in train_users},
        ranked,
        out.texts,
        labels,
        prompt_cfg,
        ratings=None,
        insert_target=True,  # a no-op for the hits; the fallback above needs it
        seed=rc.seed,
    )
    return test, train


def rerank_job(inp: LoopInputs, tokenizer: Any, work: Path, timer: StageTimer, out: LoopOutputs) -> None:
    """Zero-shot, SFT and SFT+DPO label scoring of the served retriever's top K; rows vs the retriever order."""
    cfg, rc = inp.cfg, inp.cfg.rerank
    with timer("rerank_examples"):
        test, train = rerank_examples(inp, tokenizer, out)
    hits = [i for i, e in enumerate(test) if e.target_position is not None]  # the only users the LLM can move
    info: dict[str, Any] = {
        "k": rc.k,
        "users": len(test),
        "scored_users": len(hits),
        "candidate_recall": len(hits) / max(len(test), 1),
        "train_users": len(train),
        "train_inserted": sum(e.inserted for e in train),
    }
    log.info(
        "re-rank: %d of %d test items are among the top %d (only those prompts are scored); %d training users",
        len(hits),
        len(test),
        rc.k,
        len(train),
    )
    with timer("rerank_sft"):
        sft = train_sft(inp.model_dir, sft_rows(train), rc.sft, work / "rerank_sft")
    with timer("rerank_dpo"):
        dpo = train_dpo(inp.model_dir, dpo_rows(train), rc.dpo, work / "rerank_dpo", init_adapter=sft.adapter_dir)
    info["sft"], info["dpo"] = train_summary(sft), train_summary(dpo)
    out.doc.setdefault("dpo_curves", {}).update({"rerank SFT": curve_json(sft), "rerank SFT+DPO": curve_json(dpo)})
    with timer("rerank_score"):
        prompts = [render(tokenizer, test[i].messages) for i in hits]
        ids = [[token for _, token in test[i].labels] for i in hits]
        jobs = [
            {"kind": "score", "prompts": prompts, "label_ids": ids, **policy(inp, adapter, work)}
            for adapter in (None, sft.adapter_dir, dpo.adapter_dir)
        ]
        scores = run_isolated(engine_jobs, engine_cfg(cfg), jobs) if hits else [[], [], []]
    served = inp.ranks if out.served_row == BASE_ROW else out.ranks[out.served_row]
    info["order"] = {}  # does each re-ranker follow the retriever's order or the target? (training.rerank)
    for name, per_prompt in zip(RERANK_ROWS, scores, strict=True):
        info["order"][name] = order_stats(per_prompt, [test[i].target_position for i in hits])
        ranks = served.copy()  # outside the top K: the retriever's rank, unchanged
        for i, s in zip(hits, per_prompt, strict=True):
            ranks[i] = rerank_order(s, test[i].candidates).index(test[i].target)
        out.ranks[name] = ranks
    out.doc["rerank"] = info
    out.files.update(read_tree(dpo.adapter_dir, "adapters/rerank"))
    out.adapters["rerank"] = "adapters/rerank"
