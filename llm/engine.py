"""The vLLM engine wrapper: engine construction, batched generation and one-pass label scoring.

Serves both LLM jobs of the design (SPEC sections 1 and 5): free-text generation for the preference
job, and for the re-rank job the verbalizer of LlamaRec (arXiv 2311.02089): one forward pass per
prompt, ``SamplingParams(max_tokens=1, allowed_token_ids=labels, logprobs=k)``, reading the next-token
log-probabilities of the k candidate labels. The engine runs with
``logprobs_mode="processed_logprobs"`` so those log-probabilities come *after* the allowed-token
mask: they are a distribution over the labels (their exps sum to 1).

Two engine shapes, same config: ``vllm.LLM`` for batch jobs and tests, and the in-process
``vllm.v1.engine.async_llm.AsyncLLM`` for the service, owned by an async context manager that always
shuts it down. vLLM is imported lazily, so importing this module is cheap and callers can set vLLM's
environment first (``apply_env_defaults``); this library itself never reads it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from typing import TypeAlias

    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from llm.remote import RemoteEngine

    # what the async calls run on: the in-process engine, or a vLLM server answering the same calls (llm.remote)
    AsyncEngine: TypeAlias = AsyncLLM | RemoteEngine

logger = logging.getLogger(__name__)

# The engine's environment, set (if unset) by every entry point before vLLM or the HF hub is imported:
# the CLI, the scripts, the benchmark and the load tests. The one copy; the Makefile and the Dockerfile
# export the same values.
ENGINE_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # nothing is ever downloaded from a model hub
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache per CPU engine
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # use every core for the engine worker
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def apply_env_defaults(extra: dict[str, str] | None = None) -> None:
    """``os.environ.setdefault`` for ``ENGINE_ENV_DEFAULTS`` (and ``extra``): what is already set wins."""
    import os

    for key, value in {**ENGINE_ENV_DEFAULTS, **(extra or {})}.items():
        os.environ.setdefault(key, value)


# vLLM caps SamplingParams.logprob_token_ids at 128 (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS).
MAX_LABELS = 128
# Prompts are rendered chat templates that already hold any BOS they want (as in HF and TRL).
_TOKENIZATION = {"add_special_tokens": False}
_WARM_UP_PROMPT = "Warming up the engine: " + "one two three four five six seven eight nine ten " * 8
_WARM_UP_IDS = [100, 101, 102]  # any ids inside every vocabulary

# One prompt for the async engine: its rendered text, or the token ids of that text (the engine then does not
# tokenize it again: the service has already tokenized it to count it for admission).
Prompt = str | Sequence[int]


@dataclass(frozen=True)
class EngineConfig:
    """How to build the vLLM engine. ``model`` is a local folder (see ``llm.models.resolve_model``)."""

    model: str
    tokenizer: str | None = None  # defaults to the model folder
    # bf16 halves memory, but on CPUs without AVX512-BF16/AMX vLLM falls back to slow torch matmuls:
    # measured ~3x slower than "float32" on an AVX2-only machine. Choose per deployment.
    dtype: str = "auto"  # "auto": bfloat16 where the hardware has bf16 math, else float32 (see resolve_dtype)
    max_model_len: int = 2048  # prompt + generated tokens
    enable_prefix_caching: bool = True  # system prompt and per-user parts are shared prefixes
    seed: int = 0
    max_num_seqs: int | None = None  # sequences batched per engine step; None: vLLM's default
    max_num_batched_tokens: int | None = None  # None: vLLM's default for the platform
    # KV cache block (tokens); prefix-cache hits are whole blocks. None: vLLM's default (128 on CPU, so a
    # ~60-token shared system prompt never hits; 32 lets it, and a user's stable prompt part)
    block_size: int | None = None
    max_logprobs: int = 64  # must be >= the largest number of labels scored
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 2  # adapters resident at once (preference + rerank)
    # KV cache size. None: vLLM decides, which on CPU means VLLM_CPU_KVCACHE_SPACE (GiB) if set,
    # else gpu_memory_utilization x RAM. On CPU that env var, when set, overrides this field.
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.9  # on CPU: the fraction of RAM vLLM may reserve
    # None: eager on CPU (torch.compile warm-up takes minutes there and was not faster when
    # measured), compiled + CUDA graphs on GPU.
    enforce_eager: bool | None = None
    tensor_parallel_size: int = 1
    log_stats: bool = False  # vLLM's periodic stats logging and its Prometheus metrics
    # OMP_WAIT_POLICY of the engine process, set before it starts (None: the environment's). "PASSIVE":
    # idle OpenMP threads sleep instead of spinning, so on cores shared with the API process the engine
    # does not burn the CPU the API needs to feed it and answer (docs/DECISIONS.md, docs/BENCHMARKS.md).
    # An explicit OMP_WAIT_POLICY in the environment wins.
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] | None = None
    # how long vLLM's engine core polls (sched_yield) for its worker's answer before it sleeps; applied in the
    # engine's processes by llm.vllm_plugin. None: vLLM's (1 s: it polls through every CPU step)
    ipc_busy_loop_s: float | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EngineConfig.model must be a model folder; see llm.models.resolve_model")
        if self.max_model_len < 64:
            raise ValueError(f"max_model_len must be >= 64, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_logprobs < 1:
            raise ValueError(f"max_logprobs must be >= 1, got {self.max_logprobs}")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by ``vllm.LLM`` and ``AsyncEngineArgs``."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.tokenizer or self.model,
            "dtype": resolve_dtype(self.dtype),
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": self.enable_prefix_caching,
            "seed": self.seed,
            "max_logprobs": self.max_logprobs,
            # Log-probs after the allowed_token_ids mask: label scores are a distribution over labels.
            "logprobs_mode": "processed_logprobs",
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": _eager(self.enforce_eager),
            "tensor_parallel_size": self.tensor_parallel_size,
            "disable_log_stats": not self.log_stats,
        }
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        if self.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for free-text generation (the preference job)."""

    n: int = 1  # texts per prompt (the paper samples N=10 per user for DPO pairs)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None  # per-request seed for reproducible sampling
    repetition_penalty: float = 1.0  # small models loop at temperature 0; 1.1 helps
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={self.n}, max_tokens={self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 with temperature 0 returns n identical texts; set temperature > 0")

    def sampling_params(self, final_only: bool = False) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            stop=list(self.stop) or None,
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.CUMULATIVE,
        )


def resolve_dtype(setting: str = "auto") -> str:
    """The engine dtype for ``setting``; ``auto``: bfloat16 on a GPU or a CPU with bf16 instructions
    (AVX512-BF16, AMX), float32 otherwise. The one place that decides it (engines, service, benchmarks).

    On an AVX2-only CPU vLLM falls back from oneDNN to plain torch linear layers in bf16: measured
    5-7x slower than float32 for prefill (docs/BENCHMARKS.md, "LLM prefill and decode rates").
    """
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "float32"
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


# Prompt tokens per engine step on a CPU. vLLM's CPU default, 2048, is a step of ~1.2-1.5 s on 2 cores, and
# every prompt of a step finishes at its end: a prompt admitted as a step starts waits for that step and the
# next, up to ~3 s, which admission's steady-rate prediction cannot see. At 512 (about one re-rank prompt) the
# steps are ~0.3 s: 3x fewer admitted re-ranks missed the deadline, at the same goodput (docs/BENCHMARKS.md).
CPU_STEP_TOKENS = 512


def resolve_step_tokens(setting: int | Literal["auto"] | None = "auto") -> int | None:
    """``max_num_batched_tokens`` for ``setting``: ``auto`` is ``CPU_STEP_TOKENS`` on a CPU and vLLM's
    default on a GPU (None), whose steps take milliseconds; None is vLLM's default everywhere."""
    if setting != "auto":
        return setting
    import torch

    return None if torch.cuda.is_available() else CPU_STEP_TOKENS


def make_llm(cfg: EngineConfig) -> LLM:
    """A ``vllm.LLM`` (offline, batched) engine. Start-up takes 20-50 s on CPU: build one and share it."""
    from vllm import LLM

    logger.info("starting vLLM LLM engine for %s", cfg.model)
    return LLM(**cfg.engine_kwargs())


def shutdown_llm(llm: LLM) -> None:
    """Stop the engine-core process of a ``vllm.LLM`` (vLLM 0.32 has no public ``LLM.shutdown``)."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


@dataclass
class EngineCounters:
    """Cumulative engine statistics of one ``AsyncLLM``, read off vLLM's scheduler and iteration stats."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found there (not computed again)

    def stat_logger(self) -> Any:
        """A vLLM stat-logger class that adds into these counters (vLLM builds it per engine)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        counters = self

        class _Counting(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
            ) -> None:
                if scheduler_stats is not None:
                    counters.prefix_queries += int(scheduler_stats.prefix_cache_stats.queries)
                    counters.prefix_hits += int(scheduler_stats.prefix_cache_stats.hits)
                if iteration_stats is not None:
                    counters.prompt_tokens += int(iteration_stats.num_prompt_tokens)
                    counters.generation_tokens += int(iteration_stats.num_generation_tokens)

            def log_engine_initialized(self) -> None:
                pass

        return _Counting


@contextmanager
def _engine_env(cfg: EngineConfig) -> Iterator[None]:
    """The environment the engine process is started with (it inherits this one's), restored after."""
    import os

    from llm.vllm_plugin import ENV_IPC_BUSY_LOOP_S

    wanted = {"OMP_WAIT_POLICY": cfg.omp_wait_policy, ENV_IPC_BUSY_LOOP_S: cfg.ipc_busy_loop_s}
    added = {k: str(v) for k, v in wanted.items() if v is not None and k not in os.environ}  # explicit env wins
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def make_async_engine(cfg: EngineConfig, counters: EngineCounters | None = None) -> AsyncLLM:
    """The in-process vLLM v1 ``AsyncLLM`` for the service. Prefer ``async_engine`` (always shuts down).

    With ``counters``, vLLM's stats (prefix-cache queries and hits, prompt and generated tokens) are
    added into them; vLLM's own periodic logging and Prometheus metrics stay off (``log_stats``)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    logger.info("starting vLLM AsyncLLM engine for %s", cfg.model)
    loggers = [counters.stat_logger()] if counters is not None else None
    with _engine_env(cfg):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**cfg.engine_kwargs()), stat_loggers=loggers)


@asynccontextmanager
async def async_engine(
    cfg: EngineConfig, warm_up: bool = True, counters: EngineCounters | None = None
) -> AsyncIterator[AsyncLLM]:
    """Own an ``AsyncLLM``: always shut down on exit (its engine core is a child process).

    Construction blocks the event loop for the engine start (20-50 s on CPU). That is deliberate: it
    happens once, before the service accepts requests, and vLLM forks its engine process, which is
    safest from the main thread. With ``warm_up`` the one-off cost of the first requests (seconds on
    CPU) is paid here rather than by the first user.
    """
    engine = make_async_engine(cfg, counters)
    try:
        if warm_up:
            await awarm_up(engine)
        yield engine
    finally:
        engine.shutdown()


async def awarm_up(engine: AsyncEngine) -> None:
    """One scoring and one generation request on the async engine: the first real requests do not pay set-up
    costs (seconds on CPU), and an engine that cannot serve fails here."""
    await ascore_labels(engine, _WARM_UP_PROMPT, _WARM_UP_IDS, request_id=f"warm-up-score-{uuid.uuid4().hex[:8]}")
    await agenerate(
        engine, _WARM_UP_PROMPT, GenerationConfig(max_tokens=2), request_id=f"warm-up-gen-{uuid.uuid4().hex[:8]}"
    )


def warm_up(llm: LLM) -> None:
    """Run one scoring and one generation request, so the first real request does not pay set-up costs."""
    score_labels(llm, [_WARM_UP_PROMPT], [_WARM_UP_IDS])
    generate(llm, [_WARM_UP_PROMPT], GenerationConfig(max_tokens=2), progress=False)


def engine_alive(engine: AsyncEngine) -> bool:
    """False once the engine core died or its output loop stopped. vLLM watches its engine-core process (a
    thread on the process's sentinel) and sets this within milliseconds of a crash; the engine never recovers,
    it has to be replaced (``service.supervisor``)."""
    return not engine.errored


def is_engine_dead(error: BaseException) -> bool:
    """Whether a call failed because the engine is gone (vLLM's ``EngineDeadError``, or a remote engine that does
    not answer: ``llm.remote.EngineUnreachable``, a ``ConnectionError``), not because of the request."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError | ConnectionError)


def make_lora(name: str, path: str | Path, lora_id: int) -> LoRARequest:
    """A vLLM LoRA request for a PEFT adapter folder; ``lora_id`` must be unique per adapter (>= 1)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))


def generate(
    llm: LLM,
    prompts: Sequence[str],
    gen: GenerationConfig,
    lora: LoRARequest | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """``gen.n`` texts for each rendered prompt; vLLM batches all prompts together."""
    outputs = llm.generate(
        list(prompts),
        gen.sampling_params(),
        use_tqdm=progress,
        lora_request=lora,
        tokenization_kwargs=_TOKENIZATION,
    )
    return [_texts(output) for output in outputs]


def score_labels(
    llm: LLM,
    prompts: Sequence[str],
    label_token_ids: Sequence[Sequence[int]],
    lora: LoRARequest | None = None,
    progress: bool = False,
) -> list[np.ndarray]:
    """Log-probabilities of each prompt's label tokens as its next token: one forward pass per prompt.

    Returns one array per prompt, shape ``(k,)``, ordered as its ``label_token_ids``. The values are
    normalised over the labels only (processed log-probs after the mask).
    """
    if len(prompts) != len(label_token_ids):
        raise ValueError(f"got {len(prompts)} prompts but {len(label_token_ids)} label id lists")
    params = [_scoring_params(ids) for ids in label_token_ids]
    outputs = llm.generate(
        list(prompts), params, use_tqdm=progress, lora_request=lora, tokenization_kwargs=_TOKENIZATION
    )
    return [_label_logprobs(output, ids) for output, ids in zip(outputs, label_token_ids, strict=True)]


async def agenerate(
    engine: AsyncEngine,
    prompt: Prompt,
    gen: GenerationConfig,
    request_id: str | None = None,
    lora: LoRARequest | None = None,
) -> list[str]:
    """``gen.n`` texts for one prompt on the async engine. Cancelling the task aborts the request."""
    final = await _final_output(engine, prompt, gen.sampling_params(final_only=True), request_id, lora)
    return _texts(final)


async def ascore_labels(
    engine: AsyncEngine,
    prompt: Prompt,
    label_ids: Sequence[int],
    request_id: str | None = None,
    lora: LoRARequest | None = None,
) -> np.ndarray:
    """``score_labels`` for one prompt on the async engine: shape ``(k,)``, ordered as ``label_ids``."""
    final = await _final_output(engine, prompt, _scoring_params(label_ids), request_id, lora)
    return _label_logprobs(final, label_ids)


def _scoring_params(label_ids: Sequence[int]) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    ids = [int(i) for i in label_ids]
    if not ids:
        raise ValueError("need at least one label token id to score")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label token ids must be distinct, got {ids}")
    if len(ids) > MAX_LABELS:
        raise ValueError(f"vLLM scores at most {MAX_LABELS} labels per prompt, got {len(ids)}")
    extra: dict[str, Any] = {}
    if "logprob_token_ids" in SamplingParams.__struct_fields__:  # vLLM >= 0.32; older: top-k after the mask
        extra["logprob_token_ids"] = ids  # exactly these ids come back (plus the sampled one)
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=len(ids),
        allowed_token_ids=ids,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        **extra,
    )


async def _final_output(
    engine: AsyncEngine,
    prompt: Prompt,
    params: SamplingParams,
    request_id: str | None,
    lora: LoRARequest | None,
) -> RequestOutput:
    final = None
    async for output in engine.generate(
        prompt if isinstance(prompt, str) else {"prompt_token_ids": [int(t) for t in prompt]},
        params,
        request_id or uuid.uuid4().hex,
        lora_request=lora,
        tokenization_kwargs=_TOKENIZATION,
    ):
        final = output
    if final is None:
        raise RuntimeError("the vLLM engine finished the request without an output")
    return final


def _texts(output: RequestOutput) -> list[str]:
    # n>1 completions come back in completion-index order.
    return [completion.text for completion in sorted(output.outputs, key=lambda c: c.index)]


def _label_logprobs(output: RequestOutput, label_ids: Sequence[int]) -> np.ndarray:
    logprobs = output.outputs[0].logprobs
    if not logprobs:
        raise RuntimeError("vLLM returned no log-probs; was the engine built with make_llm/make_async_engine?")
    first = logprobs[0]  # dict: token id -> Logprob, for the first (only) generated position
    return np.array([first[i].logprob if i in first else -np.inf for i in label_ids], dtype=np.float64)


def _eager(enforce_eager: bool | None) -> bool:
    if enforce_eager is not None:
        return enforce_eager
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
