"""Service settings: one ``Settings(BaseSettings)``, read from ``DPO4REC_*`` variables (and an env file).

After full-stack-fastapi-template's ``core/config.py``: the required field (``run_dir``) has no
default, cross-field rules are validators whose messages say what to change. The object is built in
``create_app()``, never as a module global, so tests and the CLI build apps with their own settings.

Lists (``DPO4REC_API_KEYS``) are read as JSON (``["k1","k2"]``) or as comma-separated text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    """Everything the service reads from its environment. Times in ms or s as their names say."""

    model_config = SettingsConfigDict(
        env_prefix="DPO4REC_", env_file=None, extra="ignore", validate_default=True, env_parse_none_str="null"
    )

    # ---- artifacts ----------------------------------------------------------------------------------
    run_dir: Path = Field(description="run directory written by `dpo4rec train` (has manifest.json)")
    verify_checksums: bool = Field(True, description="check every file's sha256 against the manifest")

    # ---- Redis preference cache ---------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="external Redis (redis://, rediss://, unix://); None = embedded redis-server"
    )
    redis_optional: bool = Field(
        False, description="/readyz stays 200 while Redis is down (requests are still answered anyway)"
    )
    redis_timeout_s: float = Field(0.25, gt=0, description="socket connect/read timeout of every call")
    redis_retry_after_s: float = Field(
        1.0, ge=0, description="after a Redis error, skip Redis this long (requests do not pay timeouts)"
    )
    preference_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of a cached preference")
    warm_cache: bool = Field(True, description="load the run's precomputed preferences into Redis at start")

    # ---- request shape ------------------------------------------------------------------------------
    rerank_k: int | None = Field(None, ge=1, description="candidates scored by the LLM; None = llm.json's")
    fusion_weight: float | None = Field(
        None, ge=0, description="the LLM's weight in the fused score; None = the run's (llm.json scoring.weight)"
    )
    retrieve_k: int = Field(100, ge=1, description="candidates retrieved from FAISS when none are given")
    max_history: int = Field(200, ge=1, description="newest request-history items kept (older are dropped)")
    max_candidates: int = Field(500, ge=1, description="more given candidates than this is a 422")
    default_top_n: int = Field(10, ge=1, description="results returned when the request has no top_n")
    deadline_ms: int = Field(3000, ge=1, description="default request deadline; a request may lower it")
    admission: bool = Field(
        True, description="skip the LLM at once (llm_shed) when its predicted completion misses the deadline"
    )
    admission_early: bool = Field(
        True,
        description="shed on a lower bound of the prompt tokens before the prompts are built and tokenized "
        "(a shed answer then costs its retrieval only; benchmarks/shed_path.py)",
    )
    admission_headroom: float = Field(
        1.2, ge=0.1, description="predicted LLM time x this must fit the remaining deadline to be admitted"
    )
    admission_queue_ms: int | None = Field(
        2000,
        ge=1,
        description="admitted LLM work waits behind at most this much predicted engine time, however long the "
        "deadline (None: up to the deadline); a short queue keeps the engine busy and admitted work on time",
    )
    engine_slots: int | None = Field(
        None,
        ge=1,
        description="admitted re-rank prompts in the engine at once; the rest wait in the service, where one whose "
        "turn comes too late gives up before the engine computes any of it (None: no limit, the engine queues "
        "them). 2 was measured worse at concurrency 4 and 16 (docs/BENCHMARKS.md)",
    )
    fallback_reserve_ms: int = Field(
        400, ge=0, description="kept from the deadline for the answer without the LLM when its stage gives up"
    )
    new_item_score: Literal["min", "mean", "max"] = Field(
        "mean", description="retriever score of a given new item (text only), from the known candidates' scores"
    )
    preference_wait: bool = Field(
        False, description="a miss waits for the LLM's preference instead of the history stand-in (batch jobs)"
    )
    stand_in_prompt_chars: int | None = Field(
        150,
        ge=16,
        description="a miss's history stand-in is cut to this many characters in the re-rank prompt (the retriever "
        "reads all of it; None: the run's max_preference_chars). Measured on validation (docs/RESULTS.md): 387 "
        "prompt tokens against 441 uncut at 300, with no loss of NDCG@10",
    )
    preference_queue: int = Field(
        64, ge=0, description="background preference generations pending at once; beyond it one is dropped"
    )
    preference_workers: int = Field(
        1, ge=1, description="background preference generations in the engine at once; the rest of the queue waits"
    )
    preference_timeout_s: float = Field(30.0, gt=0, description="bound on one background preference generation")

    # ---- protection ---------------------------------------------------------------------------------
    max_in_flight: int = Field(64, ge=1, description="concurrent /rerank requests; beyond -> 429")
    retry_after_s: int = Field(1, ge=1, description="Retry-After header of a 429")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys; empty = no authentication"
    )
    max_body_bytes: int = Field(1 << 20, ge=256, description="larger request bodies -> 413")
    drain_timeout_s: float = Field(10.0, ge=0, description="graceful shutdown: wait for in-flight requests")

    # ---- LLM engine ---------------------------------------------------------------------------------
    llm_enabled: bool = Field(True, description="False: no vLLM engine, retriever order only (flagged llm_disabled)")
    model_cache: Path = Field(Path("~/.cache/dpo4rec/models"), description="where resolve_model keeps converted models")
    llm_model: Path | None = Field(None, description="HF model folder overriding llm.json's base_model")
    max_model_len: int = Field(2048, ge=64, description="prompt + generated tokens per request")
    max_num_seqs: int = Field(16, ge=1, description="sequences the engine batches per step")
    max_num_batched_tokens: Annotated[int, Field(ge=16)] | Literal["auto"] | None = Field(
        "auto",
        description="prompt tokens per engine step (vLLM's chunked-prefill budget). auto: 512 on a CPU (about one "
        "re-rank prompt, a ~0.3 s step, so admitted work finishes when admission predicts), vLLM's default on a "
        "GPU; None: vLLM's (2048 on a CPU, a ~1.5 s step: 3x more admitted re-ranks late, docs/BENCHMARKS.md)",
    )
    llm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="engine dtype; auto = bfloat16 on GPUs and bf16-capable CPUs, else float32"
    )
    llm_adapters: Literal["merged", "lora"] = Field(
        "merged",
        description="merged: each adapter merged into its own engine's weights (fast on CPU); lora: one engine, "
        "vLLM multi-LoRA (less memory, ~10x slower prefill on CPU)",
    )
    llm_block_size: int | None = Field(
        32, ge=16, description="KV cache block in tokens; prefix-cache hits are whole blocks (None: vLLM's default)"
    )
    torch_threads: int | None = Field(
        1,
        ge=1,
        description="torch threads of the API process (retrieval, encoding); the engine process has its own. "
        "None: torch's default (every core, competing with the engine)",
    )
    api_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="niceness added to the API process once the engines run: on shared cores the engine keeps "
        "its share under a burst of fast answers (0: off)",
    )
    preference_engine_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness added to the processes of an engine that only generates preferences (a run whose "
        "preference and re-rank weights differ): on shared cores the background generations take what the "
        "re-ranks leave, and are not counted ahead of them by admission (0: equal priority)",
    )
    kv_cache_gib: float | None = Field(None, gt=0, description="KV cache size; None = vLLM's default")
    engine_omp_wait: Literal["PASSIVE", "ACTIVE"] | None = Field(
        "PASSIVE",
        description="OMP_WAIT_POLICY of the engine processes: PASSIVE lets idle OpenMP threads sleep instead of "
        "spinning on cores the API process shares (None: the environment's; an explicit OMP_WAIT_POLICY wins)",
    )
    engine_ipc_busy_loop_s: float | None = Field(
        None,
        ge=0,
        description="how long vLLM's engine core polls for its worker's answer before it sleeps (llm.vllm_plugin; "
        "None: vLLM's 1 s, which polls through every CPU step on the worker's cores). 0 frees ~25 % of a core "
        "under load, measured without a goodput gain (docs/DECISIONS.md)",
    )
    preference_max_tokens: int | None = Field(
        None, ge=1, description="generation length of a preference; None = llm.json's"
    )

    # ---- logging ------------------------------------------------------------------------------------
    log_level: LogLevel = "INFO"
    json_logs: bool = Field(True, description="one JSON object per log line (False: plain text)")

    @field_validator("run_dir", "model_cache", "llm_model", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("run_dir", mode="after")
    @classmethod
    def _run_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(
                f"run directory {value} does not exist: train one with `dpo4rec train --out {value}` "
                "or point DPO4REC_RUN_DIR at an existing run"
            )
        return value

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None  # an empty variable means "not set": embedded Redis
        if value is not None and not value.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"redis_url must start with one of {', '.join(REDIS_SCHEMES)} (got {value.split('://')[0]}://...)"
                "; leave it unset to run the embedded Redis"
            )
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_keys", mode="after")
    @classmethod
    def _keys_not_blank(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            secret = key.get_secret_value()
            if len(secret) < 8 or secret != secret.strip():
                raise ValueError("every API key needs at least 8 characters and no surrounding spaces")
        return value

    @field_validator("llm_model", mode="after")
    @classmethod
    def _model_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(
                f"llm_model {value} is not a Hugging Face model folder (no config.json); "
                "unset DPO4REC_LLM_MODEL to use the run's llm.json base_model"
            )
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        if self.default_top_n > self.max_candidates:
            raise ValueError(
                f"default_top_n ({self.default_top_n}) exceeds max_candidates ({self.max_candidates}); "
                "lower DPO4REC_DEFAULT_TOP_N or raise DPO4REC_MAX_CANDIDATES"
            )
        if self.rerank_k is not None and self.rerank_k > self.max_candidates:
            raise ValueError(
                f"rerank_k ({self.rerank_k}) exceeds max_candidates ({self.max_candidates}); lower DPO4REC_RERANK_K"
            )
        return self

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))


def load_settings(env_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, an optional env file, and keyword overrides (highest priority)."""
    return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
