"""vLLM in spawned processes for the training stages: one engine per run of jobs on the same weights.

Every engine runs in a fresh spawned process (``run_isolated``): an engine left in the training process
slowed torch about 20x on a 2-core machine. A trained adapter is applied as merged float32 weights
(``llm.engine_adapters: merged``, the default: vLLM's CPU LoRA path gathers the adapter per token, 10x
slower prefill, docs/BENCHMARKS.md) or as vLLM LoRA requests (``lora``, for GPUs). Float32, because a
bf16 merge would round most of a small LoRA update away.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm.engine import EngineConfig, GenerationConfig  # cheap: vLLM is imported lazily
from llm.weights import merge_adapter
from training.config import PipelineConfig


@dataclass(frozen=True)
class EngineSettings:
    """The engine settings every job of a training stage shares (``EngineConfig`` but the model and LoRA)."""

    max_model_len: int
    max_num_seqs: int | None
    seed: int
    max_lora_rank: int  # vLLM's supported rank at or above every LoRA the run trains
    max_logprobs: int  # at least the re-rank K: every label's log-prob is read

    def engine_config(self, model: str, enable_lora: bool) -> EngineConfig:
        return EngineConfig(
            model=model,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
            max_lora_rank=self.max_lora_rank,
            max_logprobs=self.max_logprobs,
            enable_lora=enable_lora,
        )


@dataclass(frozen=True)
class EngineWeights:
    """What a job runs on (``policy``): a model folder, and an adapter folder served as a vLLM LoRA request."""

    model: str  # the base model, or the base with an adapter merged into it
    lora: str | None = None  # None: the model alone


@dataclass(frozen=True)
class EngineJob:
    """One batch of prompts for ``engine_jobs``: generate texts, or score the labels of re-rank prompts."""

    kind: Literal["generate", "score"]
    prompts: Sequence[str]  # rendered chat prompts (llm.prompts.render)
    weights: EngineWeights
    gen: GenerationConfig | None = None  # generate: its sampling; ``gen.n`` texts per prompt come back
    label_ids: Sequence[Sequence[int]] | None = None  # score: the label token ids per prompt; (k,) log-probs back

    def __post_init__(self) -> None:
        generate, score = self.gen is not None, self.label_ids is not None
        if (self.kind, generate, score) not in (("generate", True, False), ("score", False, True)):
            raise ValueError(
                f"a {self.kind!r} job with gen={generate}, label_ids={score}: build it with "
                "EngineJob.generate(prompts, gen, weights) or EngineJob.score(prompts, label_ids, weights)"
            )

    @classmethod
    def generate(cls, prompts: Sequence[str], gen: GenerationConfig, weights: EngineWeights) -> EngineJob:
        return cls("generate", prompts, weights, gen=gen)

    @classmethod
    def score(cls, prompts: Sequence[str], label_ids: Sequence[Sequence[int]], weights: EngineWeights) -> EngineJob:
        return cls("score", prompts, weights, label_ids=label_ids)


def run_isolated(fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` in a fresh spawned process. A vLLM engine left in the training process keeps
    worker threads spinning and slowed SASRec training about 20x on this 2-core machine."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def engine_jobs(settings: EngineSettings, jobs: Sequence[EngineJob]) -> list[Any]:
    """Runs in a spawned process: the jobs in order, one vLLM engine per run of jobs on the same model.

    Per job: a generate job returns ``gen.n`` texts per prompt, a score job a (k,) label log-prob array
    per prompt.
    """
    from llm.engine import generate, make_llm, make_lora, score_labels, shutdown_llm

    out: list[Any] = []
    start = 0
    while start < len(jobs):
        model = jobs[start].weights.model
        end = start
        while end < len(jobs) and jobs[end].weights.model == model:
            end += 1
        loras = sorted({job.weights.lora for job in jobs[start:end] if job.weights.lora})
        engine = make_llm(settings.engine_config(model, enable_lora=bool(loras)))
        requests = {path: make_lora(f"adapter{i}", path, i) for i, path in enumerate(loras, start=1)}
        try:
            for job in jobs[start:end]:
                lora = requests.get(job.weights.lora or "")
                if job.gen is not None:  # a generate job (checked in EngineJob.__post_init__)
                    texts = generate(engine, job.prompts, job.gen, lora=lora, progress=True)
                    out.append([[t.strip() for t in per_prompt] for per_prompt in texts])
                elif job.label_ids is not None:  # a score job
                    out.append(score_labels(engine, job.prompts, job.label_ids, lora=lora, progress=True))
        finally:
            shutdown_llm(engine)
        start = end
    return out


def policy(cfg: PipelineConfig, model_dir: Path, adapter: Path | None, work: Path) -> EngineWeights:
    """The weights that serve base + ``adapter`` (see ``llm.engine_adapters``)."""
    if adapter is None:
        return EngineWeights(str(model_dir))
    if cfg.llm.engine_adapters == "lora":
        return EngineWeights(str(model_dir), str(adapter))
    merged = work / f"merged-{adapter.parent.name}"
    if not merged.exists():
        merge_adapter(model_dir, adapter, merged, dtype="float32")
    return EngineWeights(str(merged))


def engine_cfg(cfg: PipelineConfig, seed: int | None = None) -> EngineSettings:
    ranks = [cfg.preference_dpo.train.lora_r, cfg.rerank.sft.lora_r, cfg.rerank.dpo.lora_r, 16]
    rank = next(r for r in (8, 16, 32, 64, 128, 256) if r >= max(ranks))  # vLLM's supported max_lora_rank
    return EngineSettings(
        max_model_len=cfg.llm.max_model_len,
        max_num_seqs=cfg.llm.max_num_seqs,
        seed=cfg.llm.seed if seed is None else seed,
        max_lora_rank=rank,
        max_logprobs=max(64, cfg.rerank.k),
    )


def greedy(cfg: PipelineConfig) -> GenerationConfig:
    """The pipeline's generation settings for the one preference per user (so rows compare like for like)."""
    return GenerationConfig(
        n=1,
        temperature=cfg.llm.temperature,
        max_tokens=cfg.llm.max_tokens,
        repetition_penalty=cfg.llm.repetition_penalty,
    )  # no per-request seed: see sampling


def sampling(cfg: PipelineConfig) -> GenerationConfig:
    # No per-request seed: vLLM 0.32 on CPU crashes on a seeded request whose prefill is chunked ("CPU
    # Generator does not use offset", gpu_model_runner._bookkeeping_sync). The engine's seed
    # (engine_cfg, per round) makes sampling repeatable instead.
    p = cfg.preference_dpo
    return GenerationConfig(
        n=p.samples_per_user,
        temperature=p.temperature,
        top_p=p.top_p,
        max_tokens=p.max_tokens or cfg.llm.max_tokens,
        repetition_penalty=cfg.llm.repetition_penalty,
    )
