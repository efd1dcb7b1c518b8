"""vLLM in spawned processes for the training stages: one engine per run of jobs on the same weights.

Every engine runs in a fresh spawned process (``run_isolated``): an engine left in the training process
slowed torch about 20x on a 2-core machine. A trained adapter is applied as merged float32 weights
(``llm.engine_adapters: merged``, the default: vLLM's CPU LoRA path gathers the adapter per token, 10x
slower prefill, docs/BENCHMARKS.md) or as vLLM LoRA requests (``lora``, for GPUs). Float32, because a
bf16 merge would round most of a small LoRA update away.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from llm.weights import merge_adapter
from training.config import PipelineConfig


def run_isolated(fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` in a fresh spawned process. A vLLM engine left in the training process keeps
    worker threads spinning and slowed SASRec training about 20x on this 2-core machine."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


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


def policy(cfg: PipelineConfig, model_dir: Path, adapter: Path | None, work: Path) -> dict[str, str | None]:
    """The ``model``/``lora`` job fields that serve base + ``adapter`` (see ``llm.engine_adapters``)."""
    if adapter is None:
        return {"model": str(model_dir), "lora": None}
    if cfg.llm.engine_adapters == "lora":
        return {"model": str(model_dir), "lora": str(adapter)}
    merged = work / f"merged-{adapter.parent.name}"
    if not merged.exists():
        merge_adapter(model_dir, adapter, merged, dtype="float32")
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


def greedy(cfg: PipelineConfig) -> dict[str, Any]:
    """The pipeline's generation settings for the one preference per user (so rows compare like for like)."""
    return {
        "n": 1,
        "temperature": cfg.llm.temperature,
        "max_tokens": cfg.llm.max_tokens,
        "repetition_penalty": cfg.llm.repetition_penalty,
    }  # no per-request seed: see sampling


def sampling(cfg: PipelineConfig) -> dict[str, Any]:
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
