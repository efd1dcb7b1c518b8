"""The DPO loop of DPO4Rec and the aligned re-rank job, on top of the offline pipeline's state.

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

Then the re-rank job (``training.rerank_job``): zero-shot, SFT and SFT+DPO label scoring of the served
retriever's top K. ``run_loop`` runs both and adds the bootstrap comparisons the paper makes.

Every vLLM engine runs in a spawned process (``training.pipeline.run_isolated``): an engine left in the
training process slowed torch about 20x on a 2-core machine. The engines apply a trained adapter as
merged float32 weights (``llm.engine_adapters: merged``, the default: vLLM's CPU LoRA path gathers the
adapter per token, 10x slower prefill, docs/BENCHMARKS.md) or as vLLM LoRA requests (``lora``, for
GPUs). Float32, because a bf16 merge would round most of a small LoRA update away. The run directory
keeps the adapters.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm.prompts import preference_messages, render
from llm.scoring import ScoringSpec
from llm.weights import merge_adapter
from retrieval.catalog import Catalog
from retrieval.encoder import TextEncoder
from retrieval.sasrec import SASRec
from training import metrics as M
from training.config import PipelineConfig
from training.dpo import TrainResult, train_dpo
from training.pairs import PairSet, build_pairs, save_pairs
from training.pipeline import StageTimer, _train_sasrec, prompt_config, ranks_on_test, run_isolated
from training.preferences import history_items
from training.retriever import score_users
from training.reward import reward_inputs, rewards
from training.split import Split

log = logging.getLogger(__name__)

BASE_ROW = "SASRec + base-LLM preferences"
PREFERENCE_METRICS = ("NDCG@10", "Recall@10")


def aligned_row(round_: int) -> str:
    return f"SASRec + DPO-aligned preferences (round {round_})"


@dataclass
class LoopInputs:
    """The pipeline's state after the base-preference row."""

    cfg: PipelineConfig
    catalog: Catalog
    split: Split
    users: list[str]
    model_dir: Path  # the base LLM folder (llm.models.resolve_model)
    encoder: TextEncoder
    texts: dict[str, str]  # base-LLM preference per user
    vectors: np.ndarray  # (U, D) their encoder vectors, rows in ``users`` order
    retriever: SASRec  # the augmented SASRec trained on ``vectors``
    ranks: np.ndarray  # (U,) its test ranks: the base-preference row
    samples: dict[str, list[str]] | None = None  # round-1 samples per DPO user (base_preferences_and_samples)


@dataclass
class LoopOutputs:
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # new rows, in order
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    served_row: str = BASE_ROW  # the row of the retriever the run serves
    texts: dict[str, str] = field(default_factory=dict)  # served preferences (aligned if the loop ran)
    vectors: np.ndarray | None = None
    retriever: SASRec | None = None
    adapters: dict[str, str | None] = field(default_factory=lambda: {"preference": None, "rerank": None})
    files: dict[str, bytes] = field(default_factory=dict)  # run-relative path -> content (adapters, pairs)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # SASRec validation curves
    doc: dict[str, Any] = field(default_factory=dict)  # metrics.json additions
    scoring: ScoringSpec | None = None  # how the service scores the re-rank (llm.json), when the job ran


# ---- vLLM in a spawned process ------------------------------------------------------------------------


def engine_jobs(settings: dict[str, Any], jobs: list[dict[str, Any]]) -> list[Any]:
    """Runs in a spawned process: the jobs in order, one vLLM engine per run of jobs on the same model.

    ``settings``: EngineConfig fields but the model (``engine_cfg``).
    A job is ``{"kind": "generate", "prompts", "gen": GenerationConfig fields, "model", "lora"}``
    (returns ``n`` texts per prompt) or ``{"kind": "score", "prompts", "label_ids", "model", "lora"}``
    (returns a (k,) label log-prob array per prompt); ``model`` is a folder, ``lora`` an adapter or None.
    """
    from llm.engine import EngineConfig, GenerationConfig, generate, make_llm, make_lora, score_labels, shutdown_llm

    out: list[Any] = []
    start = 0
    while start < len(jobs):
        model = jobs[start]["model"]
        end = start
        while end < len(jobs) and jobs[end]["model"] == model:
            end += 1
        loras = sorted({job["lora"] for job in jobs[start:end] if job.get("lora")})
        engine = make_llm(EngineConfig(**settings, model=model, enable_lora=bool(loras)))
        requests = {path: make_lora(f"adapter{i}", path, i) for i, path in enumerate(loras, start=1)}
        try:
            for job in jobs[start:end]:
                lora = requests.get(job.get("lora") or "")
                if job["kind"] == "generate":
                    texts = generate(engine, job["prompts"], GenerationConfig(**job["gen"]), lora=lora, progress=True)
                    out.append([[t.strip() for t in per_prompt] for per_prompt in texts])
                else:
                    out.append(score_labels(engine, job["prompts"], job["label_ids"], lora=lora, progress=True))
        finally:
            shutdown_llm(engine)
        start = end
    return out


def policy(inp: LoopInputs, adapter: Path | None, work: Path) -> dict[str, str | None]:
    """The ``model``/``lora`` job fields that serve base + ``adapter`` (see ``llm.engine_adapters``)."""
    if adapter is None:
        return {"model": str(inp.model_dir), "lora": None}
    if inp.cfg.llm.engine_adapters == "lora":
        return {"model": str(inp.model_dir), "lora": str(adapter)}
    merged = work / f"merged-{adapter.parent.name}"
    if not merged.exists():
        merge_adapter(inp.model_dir, adapter, merged, dtype="float32")
    return {"model": str(merged), "lora": None}


def engine_cfg(cfg: PipelineConfig, seed: int | None = None) -> dict[str, Any]:
    ranks = [cfg.preference_dpo.train.lora_r, cfg.rerank.sft.lora_r, cfg.rerank.dpo.lora_r, 16]
    rank = next(r for r in (8, 16, 32, 64, 128, 256) if r >= max(ranks))  # vLLM's supported max_lora_rank
    return {
        "max_model_len": cfg.llm.max_model_len,
        "max_num_seqs": cfg.llm.max_num_seqs,
        "seed": cfg.llm.seed if seed is None else seed,
        "max_lora_rank": rank,
        "max_logprobs": max(64, cfg.rerank.k),
    }


def _greedy(cfg: PipelineConfig) -> dict[str, Any]:
    """The pipeline's generation settings for the one preference per user (so rows compare like for like)."""
    return {
        "n": 1,
        "temperature": cfg.llm.temperature,
        "max_tokens": cfg.llm.max_tokens,
        "repetition_penalty": cfg.llm.repetition_penalty,
    }  # no per-request seed: see _sampling


def _sampling(cfg: PipelineConfig) -> dict[str, Any]:
    # No per-request seed: vLLM 0.32 on CPU crashes on a seeded request whose prefill is chunked ("CPU
    # Generator does not use offset", gpu_model_runner._bookkeeping_sync). The engine's seed
    # (engine_cfg, per round) makes sampling repeatable instead.
    p = cfg.preference_dpo
    return {
        "n": p.samples_per_user,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens or cfg.llm.max_tokens,
        "repetition_penalty": cfg.llm.repetition_penalty,
    }


# ---- helpers ---------------------------------------------------------------------------------------------


def sample_users(users: Sequence[str], n: int | None, seed: int) -> list[str]:
    """``n`` users drawn without replacement (seeded), kept in ``users`` order; all when n is None."""
    if n is None or n >= len(users):
        return list(users)
    picked = set(np.random.default_rng(seed).choice(len(users), size=n, replace=False).tolist())
    return [u for i, u in enumerate(users) if i in picked]


def compare(
    per_user: dict[str, dict[str, np.ndarray]], a: str, b: str, metrics: Sequence[str], n_boot: int
) -> list[dict[str, Any]]:
    return [
        {"a": a, "b": b, "metric": m, **M.bootstrap_diff(per_user[a][m], per_user[b][m], n_boot=n_boot)}
        for m in metrics
    ]


def _finite(values: Sequence[float]) -> list[float | None]:
    """JSON-safe curve values: NaN (a key a logging step lacked) becomes null."""
    return [None if (v is None or math.isnan(v)) else round(float(v), 6) for v in values]


def train_summary(result: TrainResult) -> dict[str, Any]:
    return {
        "examples": result.examples,
        "dropped_long": result.dropped_long,
        "setup_seconds": result.setup_seconds,
        "train_seconds": result.train_seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
    }


def curve_json(result: TrainResult) -> dict[str, list[float | None]]:
    return {key: _finite(values) for key, values in result.curves.items()}


def read_tree(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(folder)}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the preference loop ------------------------------------------------------------------------------


def _preference_prompts(
    cfg: PipelineConfig, tokenizer: Any, catalog: Catalog, split: Split, users: Sequence[str]
) -> tuple[dict[str, list[dict[str, str]]], dict[str, str]]:
    """(chat messages, rendered prompt) per user: the pipeline's preference prompt, training items only."""
    prompt_cfg = prompt_config(cfg)
    messages = {
        u: preference_messages(history_items(catalog, split.users[u].train, split.users[u].train_ratings), prompt_cfg)
        for u in users
    }  # never the validation or test item
    return messages, {u: render(tokenizer, m) for u, m in messages.items()}


def base_preferences_and_samples(
    cfg: PipelineConfig, catalog: Catalog, split: Split, users: list[str], model_dir: Path
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The pipeline's greedy base preferences for every user AND round 1's N samples per DPO user, from
    one engine (one start less; the greedy job runs first and alone, so its texts are the pipeline's)."""
    from transformers import AutoTokenizer

    _, rendered = _preference_prompts(cfg, AutoTokenizer.from_pretrained(model_dir), catalog, split, users)
    dpo_users = sample_users(users, cfg.preference_dpo.max_users, cfg.preference_dpo.seed)
    base = {"model": str(model_dir), "lora": None}
    jobs = [
        {"kind": "generate", "prompts": [rendered[u] for u in users], "gen": _greedy(cfg), **base},
        {"kind": "generate", "prompts": [rendered[u] for u in dpo_users], "gen": _sampling(cfg), **base},
    ]
    greedy, samples = run_isolated(engine_jobs, engine_cfg(cfg, cfg.preference_dpo.seed + 1), jobs)
    return ({u: g[0] for u, g in zip(users, greedy, strict=True)}, dict(zip(dpo_users, samples, strict=True)))


@dataclass
class _RoundState:
    """What a round starts from: the served texts/vectors, the reward model, the policy's adapter."""

    texts: dict[str, str]
    vectors: np.ndarray  # (U, D) in the pipeline's user order
    reward_model: SASRec  # the augmented SASRec trained on ``vectors``
    adapter: Path | None = None  # the preference adapter so far (None: the base model)
    samples: list[list[str]] | None = None  # this round's N samples per DPO user, if already drawn


def _pairs(
    inp: LoopInputs,
    r: int,
    state: _RoundState,
    dpo_users: list[str],
    messages: dict[str, Any],
    work: Path,
    out: LoopOutputs,
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
    out.files.update({f"dpo/{name}{ext}": (work / f"{name}{ext}").read_bytes() for ext in (".jsonl", ".stats.json")})
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
    inp: LoopInputs, state: _RoundState, texts: dict[str, str], vectors: np.ndarray, dpo_users: list[str]
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


def align_preferences(inp: LoopInputs, tokenizer: Any, work: Path, timer: StageTimer, out: LoopOutputs) -> None:
    """DPO4Rec's loop for ``preference_dpo.rounds`` rounds; fills ``out`` (rows, served state, adapter)."""
    cfg, p, split, users = inp.cfg, inp.cfg.preference_dpo, inp.split, inp.users
    messages, rendered = _preference_prompts(cfg, tokenizer, inp.catalog, split, users)
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
                job = {
                    "kind": "generate",
                    "prompts": [rendered[u] for u in dpo_users],
                    "gen": _sampling(cfg),
                    **policy(inp, state.adapter, work),
                }
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
            aligned = policy(inp, result.adapter_dir, work)
            jobs = [{"kind": "generate", "prompts": [rendered[u] for u in users], "gen": _greedy(cfg), **aligned}]
            if r < p.rounds:  # the next round's samples come from this policy: same engine, one start less
                jobs.append(
                    {"kind": "generate", "prompts": [rendered[u] for u in dpo_users], "gen": _sampling(cfg), **aligned}
                )
            generated = run_isolated(engine_jobs, engine_cfg(cfg, p.seed + r + 1), jobs)
            texts = {u: per_user[0] for u, per_user in zip(users, generated[0], strict=True)}
        with timer(f"dpo_r{r}_encode"):
            vectors = inp.encoder.encode([texts[u] for u in users], progress=True)
            info["reward_check"] = _reward_check(inp, state, texts, vectors, dpo_users)
        with timer(f"dpo_r{r}_sasrec"):
            prefs = {u: vectors[i] for i, u in enumerate(users)}
            model, curve = _train_sasrec(cfg, inp.catalog, split, users, prefs, vectors.shape[1])
            out.ranks[aligned_row(r)] = ranks_on_test(score_users(model, test_seqs, prefs, users), split, users)
            out.curves[aligned_row(r)] = curve
        out.served_row = aligned_row(r)
        state = _RoundState(texts, vectors, model, result.adapter_dir, generated[1] if len(generated) > 1 else None)
    out.doc["dpo_loop"] = {"rounds": rounds, "dpo_users": len(dpo_users), "samples_per_user": p.samples_per_user}
    out.texts, out.vectors, out.retriever = state.texts, state.vectors, state.reward_model
    if state.adapter is not None:
        out.files.update(read_tree(state.adapter, "adapters/preference"))
        out.adapters["preference"] = "adapters/preference"


# ---- entry point ----------------------------------------------------------------------------------------


def run_loop(inp: LoopInputs, timer: StageTimer) -> LoopOutputs:
    """The preference loop (if ``preference_dpo.rounds``) then the re-rank job (if ``rerank.enabled``)."""
    from transformers import AutoTokenizer

    cfg = inp.cfg
    tokenizer = AutoTokenizer.from_pretrained(inp.model_dir)
    out = LoopOutputs(texts=inp.texts, vectors=inp.vectors, retriever=inp.retriever)
    work = Path(tempfile.mkdtemp(prefix="dpo4rec-loop-"))
    try:
        if cfg.preference_dpo.rounds:
            align_preferences(inp, tokenizer, work, timer, out)
        if cfg.rerank.enabled:
            from training.rerank_job import rerank_job  # it imports this module

            rerank_job(inp, tokenizer, work, timer, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_user = {name: M.per_user(r) for name, r in {BASE_ROW: inp.ranks, **out.ranks}.items()}
    n_boot = cfg.eval.bootstrap
    for name in out.ranks:
        if name.startswith("SASRec + DPO-aligned"):
            out.comparisons += compare(per_user, name, BASE_ROW, PREFERENCE_METRICS, n_boot)
    if cfg.rerank.enabled:
        from training.rerank_job import rerank_comparisons

        out.comparisons += rerank_comparisons(per_user, out.served_row, n_boot)
    return out
