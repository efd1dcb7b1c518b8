"""The DPO loop of DPO4Rec: preference alignment on top of the base-preference row.

Preference alignment (Sun et al., arXiv 2410.05939, steps 3-5), for round r = 1..R:
sample N preference texts per DPO user with vLLM (the policy: base model + the preference adapter of
round r-1) -> encode them (frozen text encoder) -> reward = NDCG@k of the user's **validation** item
under the knowledge-augmented SASRec of round r-1 (``training.reward``) -> (best, worst) pairs, ties
dropped (``training.pairs``) -> TRL DPO on the preference LoRA adapter (``training.dpo``) ->
regenerate every user's preference greedily with the aligned model -> retrain the augmented SASRec on
them (the next round's reward model) -> test row "SASRec + DPO-aligned preferences (round r)".

Round chaining: ONE preference adapter on the original base model, iterated. Round r continues round
r-1's adapter (``train_dpo(init_adapter=...)``), and TRL freezes a copy of it as the reference, so the
reference of round r is the policy of round r-1: the same objective as merging round r-1 into a new base
and training a fresh LoRA on it, but the result stays one adapter on the base that ``llm.json`` names,
servable next to the re-rank adapter by vLLM multi-LoRA (the service's shape). Its LoRA shape is fixed by
round 1.

Every vLLM engine runs in a spawned process with merged adapter weights (``training.engines``); the
run directory keeps the adapter (``rundir.writer``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm.prompts import render
from retrieval.sasrec import SASRec
from training import ranking_metrics as M
from training.base_preferences import preference_messages_of
from training.dpo import train_dpo
from training.engines import EngineJob, engine_cfg, engine_jobs, greedy, policy, run_isolated, sampling
from training.pairs import PairSet, build_pairs, save_pairs
from training.retriever import score_users
from training.reward import reward_inputs, rewards
from training.stages import (
    BASE_ROW,
    Served,
    StageInputs,
    StageTimer,
    compare,
    curve_json,
    ranks_on_test,
    sample_users,
    train_sasrec,
    train_summary,
)

log = logging.getLogger(__name__)

PREFERENCE_METRICS = ("NDCG@10", "Recall@10")


def aligned_row(round_: int) -> str:
    return f"SASRec + DPO-aligned preferences (round {round_})"


@dataclass
class AlignResult:
    """What the DPO loop made: its rows and curves, what the run serves after it, the preference adapter."""

    served: Served  # the last round's texts, vectors and retrained SASRec (the base row's if no round ran)
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # "SASRec + DPO-aligned preferences (round r)"
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # their SASRec validation curves
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # each aligned row vs the base row
    adapter: Path | None = None  # the preference adapter (None: no round trained)
    files: dict[str, Path] = field(default_factory=dict)  # run-relative name -> file (the DPO pairs)
    doc: dict[str, Any] = field(default_factory=dict)  # metrics.json additions


@dataclass
class _RoundState:
    """What a round starts from: the served texts/vectors, the reward model, the policy's adapter."""

    texts: dict[str, str]
    vectors: np.ndarray  # (U, D) in the pipeline's user order
    reward_model: SASRec  # the augmented SASRec trained on ``vectors``
    adapter: Path | None = None  # the preference adapter so far (None: the base model)
    samples: list[list[str]] | None = None  # this round's N samples per DPO user, if already drawn


def _pairs(
    inp: StageInputs,
    r: int,
    state: _RoundState,
    dpo_users: list[str],
    messages: dict[str, Any],
    work: Path,
    out: AlignResult,
    info: dict[str, Any],
) -> PairSet:
    """Encode the samples, reward them on the validation item, (best, worst) pairs; records distributions."""
    p = inp.cfg.preference_dpo
    assert state.samples is not None
    seqs, valid = reward_inputs(inp.split, dpo_users)
    flat = [t for per_user in state.samples for t in per_user]  # user-major, as training.reward wants
    reward = rewards(state.reward_model, inp.encoder.encode(flat, progress=True), seqs, valid, k=p.reward_k)  # (U, N)
    row = {u: i for i, u in enumerate(inp.users)}
    greedy = rewards(state.reward_model, state.vectors[[row[u] for u in dpo_users]], seqs, valid, k=p.reward_k)
    pairs = build_pairs(
        {u: messages[u] for u in dpo_users},
        dict(zip(dpo_users, state.samples, strict=True)),
        reward,
        min_margin=p.min_margin,
    )
    name = f"preference_round{r}_pairs"
    save_pairs(work / f"{name}.jsonl", pairs)
    out.files.update({f"dpo/{name}{ext}": work / f"{name}{ext}" for ext in (".jsonl", ".stats.json")})
    info.update(
        pairs=vars(pairs.stats),
        sample_reward_mean=float(reward.mean()),
        sample_reward_best_mean=float(reward.max(axis=1).mean()),
        greedy_reward_mean=float(greedy.mean()),
    )
    out.doc.setdefault("reward_distributions", {})[f"round {r}"] = {
        "chosen": [pair["reward_chosen"] for pair in pairs.rows],
        "rejected": [pair["reward_rejected"] for pair in pairs.rows],
        "samples": [round(float(x), 6) for x in reward.ravel()],
    }
    log.info(
        "round %d: %d pairs from %d users (%d tied); mean reward: samples %.4f, best of N %.4f, greedy %.4f",
        r,
        pairs.stats.kept,
        len(dpo_users),
        pairs.stats.dropped_ties,
        info["sample_reward_mean"],
        info["sample_reward_best_mean"],
        info["greedy_reward_mean"],
    )
    return pairs


def _reward_check(
    inp: StageInputs, state: _RoundState, texts: dict[str, str], vectors: np.ndarray, dpo_users: list[str]
) -> dict[str, Any]:
    """Did DPO raise what it optimised? Validation reward of the greedy texts before vs after, under this
    round's reward model, for every user and for the DPO users."""
    seqs, valid = reward_inputs(inp.split, inp.users)
    k = inp.cfg.preference_dpo.reward_k
    before = rewards(state.reward_model, state.vectors, seqs, valid, k=k)[:, 0]  # (U,)
    after = rewards(state.reward_model, vectors, seqs, valid, k=k)[:, 0]
    in_dpo = np.isin(np.asarray(inp.users), dpo_users)
    return {
        "all_users": {"before": float(before.mean()), "after": float(after.mean())},
        "dpo_users": {"before": float(before[in_dpo].mean()), "after": float(after[in_dpo].mean())},
        "changed_texts": int(sum(texts[u] != state.texts[u] for u in inp.users)),
    }


def align_preferences(inp: StageInputs, tokenizer: Any, work: Path, timer: StageTimer) -> AlignResult:
    """DPO4Rec's loop for ``preference_dpo.rounds`` rounds: the aligned rows, what the run then serves, the
    preference adapter; ``work`` holds the adapters and pairs until the run directory is written."""
    cfg, p, split, users = inp.cfg, inp.cfg.preference_dpo, inp.split, inp.users
    messages = preference_messages_of(cfg, inp.catalog, split, users)
    rendered = {u: render(tokenizer, m) for u, m in messages.items()}
    out = AlignResult(served=Served(BASE_ROW, inp.texts, inp.vectors, inp.retriever, inp.ranks))
    dpo_users = sample_users(users, p.max_users, p.seed)
    test_seqs = {u: [*split.users[u].train, split.users[u].valid] for u in users}
    state = _RoundState(
        inp.texts,
        inp.vectors,
        inp.retriever,
        samples=[inp.samples[u] for u in dpo_users] if inp.samples is not None else None,
    )
    rounds: list[dict[str, Any]] = []
    log.info(
        "DPO loop: %d round(s), %d DPO users x %d samples, %d users regenerated per round",
        p.rounds,
        len(dpo_users),
        p.samples_per_user,
        len(users),
    )
    for r in range(1, p.rounds + 1):
        info: dict[str, Any] = {"round": r, "dpo_users": len(dpo_users)}
        rounds.append(info)
        if state.samples is None:  # later rounds (and round 1 outside the pipeline) sample here
            with timer(f"dpo_r{r}_sample"):
                weights = policy(cfg, inp.model_dir, state.adapter, work)
                job = EngineJob.generate([rendered[u] for u in dpo_users], sampling(cfg), weights)
                (state.samples,) = run_isolated(engine_jobs, engine_cfg(cfg, p.seed + r), [job])
        with timer(f"dpo_r{r}_reward"):
            pairs = _pairs(inp, r, state, dpo_users, messages, work, out, info)
        if not pairs.rows:
            log.warning("round %d: no preference pairs (every user's samples tie); the loop stops here", r)
            break
        with timer(f"dpo_r{r}_train"):
            result = train_dpo(inp.model_dir, pairs, p.train, work / f"preference_round{r}", init_adapter=state.adapter)
        info["train"] = train_summary(result)
        out.doc.setdefault("dpo_curves", {})[f"preference round {r}"] = curve_json(result)
        with timer(f"dpo_r{r}_generate"):
            aligned = policy(cfg, inp.model_dir, result.adapter_dir, work)
            jobs = [EngineJob.generate([rendered[u] for u in users], greedy(cfg), aligned)]
            if r < p.rounds:  # the next round's samples come from this policy: same engine, one start less
                jobs.append(EngineJob.generate([rendered[u] for u in dpo_users], sampling(cfg), aligned))
            generated = run_isolated(engine_jobs, engine_cfg(cfg, p.seed + r + 1), jobs)
            texts = {u: per_user[0] for u, per_user in zip(users, generated[0], strict=True)}
        with timer(f"dpo_r{r}_encode"):
            vectors = inp.encoder.encode([texts[u] for u in users], progress=True)
            info["reward_check"] = _reward_check(inp, state, texts, vectors, dpo_users)
        with timer(f"dpo_r{r}_sasrec"):
            prefs = {u: vectors[i] for i, u in enumerate(users)}
            model, curve = train_sasrec(cfg, inp.catalog, split, users, prefs, vectors.shape[1])
            ranks = ranks_on_test(score_users(model, test_seqs, prefs, users), split, users)
            out.ranks[aligned_row(r)] = ranks
            out.curves[aligned_row(r)] = curve
        out.served = Served(aligned_row(r), texts, vectors, model, ranks)
        state = _RoundState(texts, vectors, model, result.adapter_dir, generated[1] if len(generated) > 1 else None)
    out.doc["dpo_loop"] = {"rounds": rounds, "dpo_users": len(dpo_users), "samples_per_user": p.samples_per_user}
    out.adapter = state.adapter
    per_user = {name: M.per_user(r) for name, r in {BASE_ROW: inp.ranks, **out.ranks}.items()}
    for name in out.ranks:
        out.comparisons += compare(per_user, name, BASE_ROW, PREFERENCE_METRICS, cfg.eval.bootstrap)
    return out
