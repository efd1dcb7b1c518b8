"""What the LLM engines run: the jobs, their weights, each engine's configuration, in process or on the engine tier.

- **Jobs and weights** (``served_jobs``): a job ("preference", "rerank") runs on the base model plus its adapter
  from ``llm.json``; re-rank only when the scoring calls the LLM (``llm_jobs``). With ``llm_adapters = "merged"``
  (the default) each adapter is merged into a cached full model and each distinct set of weights gets its own
  engine (vLLM's CPU LoRA path is ~10x slower at prefill); with ``"lora"`` one engine serves both jobs.
- **In process** (``supervised_engines``): one ``EngineConfig`` per distinct model folder, owned by
  ``service.supervisor``.
- **The engine tier** (SPEC section 11, ``remote_targets``): with ``DPO4REC_ENGINE_URL`` the service and the batch
  jobs start no engine; each job's calls go to a vLLM OpenAI-compatible server (``llm.remote.RemoteEngine``) under
  the same admission, deadlines and fallbacks (the supervisor holds it, and never restarts it: the engine pods have
  their own probes). ``dpo4rec engine`` starts such a server for a run (``engine_command``): ``vllm serve`` with
  the in-process engine's settings (``llm.serve``), the jobs' weights merged as here, or as LoRA modules.

**Served names carry the weights.** A job's weights are served as ``{job}-{digest}``, the digest of the base model
and the adapter's files (their manifest checksums), whatever ``llm_adapters`` says. The API asks for the name of the
run it serves, so an engine pod still serving another model version answers 404 and the version is refused at load
(``RemoteEngine.open``), instead of scoring with weights the run's fusion weights were not chosen for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm.engine import EngineConfig, resolve_dtype, resolve_step_tokens
from llm.models import resolve_model
from llm.remote import RemoteTarget
from llm.scoring import ScoringSpec
from llm.weights import merged_model
from rundir.spec import JOBS, LLMSpec
from service.settings import Settings
from service.supervisor import RestartPolicy, SupervisedEngine


@dataclass(frozen=True)
class JobWeights:
    """What one LLM job runs on: a model folder, and a LoRA folder when adapters are served as LoRA."""

    model: Path
    lora: Path | None = None


def served_scoring(settings: Settings, spec: LLMSpec) -> ScoringSpec:
    """The run's scoring (``llm.json``), with the fusion weight overridden when the settings say so."""
    if settings.fusion_weight is None:
        return spec.scoring
    return replace(spec.scoring, weight=settings.fusion_weight, slice_weights=None)  # one weight for every slice


def rerank_k(settings: Settings, spec: LLMSpec) -> int:
    """The most candidates one re-rank scores: the settings' ``rerank_k``, else the run's (``llm.json``), never more
    than the run's label prior covers (the labels it measured). The labels prepared at start, the engine's
    ``max_logprobs`` and the pipeline's head all read it here."""
    k = settings.rerank_k or spec.rerank_k
    prior = spec.scoring.log_prior
    return k if prior is None else min(k, len(prior))


def llm_jobs(settings: Settings, spec: LLMSpec) -> list[str]:
    """The LLM jobs the service runs: re-rank only when the scoring calls the LLM."""
    return ["preference"] + (["rerank"] if served_scoring(settings, spec).uses_llm else [])


def served_jobs(
    settings: Settings, spec: LLMSpec, model_dir: Path, jobs: list[str] | None = None
) -> dict[str, JobWeights]:
    """``jobs`` (default: the served ones, ``llm_jobs``) and their weights."""
    out: dict[str, JobWeights] = {}
    for job in llm_jobs(settings, spec) if jobs is None else jobs:
        adapter = spec.adapters.get(job)
        if adapter is None:
            out[job] = JobWeights(model_dir)
        elif settings.llm_adapters == "lora":
            out[job] = JobWeights(model_dir, adapter)
        else:  # merged once per adapter content, reused by every later start
            out[job] = JobWeights(merged_model(model_dir, adapter, settings.merge_cache))
    return out


def engine_config(settings: Settings, spec: LLMSpec, model: Path, lora: bool) -> EngineConfig:
    """The ``EngineConfig`` of one service engine (the benchmark's bare engine uses this too)."""
    return EngineConfig(
        model=str(model),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=resolve_step_tokens(settings.max_num_batched_tokens),
        max_logprobs=max(64, rerank_k(settings, spec)),
        enable_lora=lora,
        kv_cache_gib=settings.kv_cache_gib,
        dtype=resolve_dtype(settings.llm_dtype),
        block_size=settings.llm_block_size,
        omp_wait_policy=settings.engine_omp_wait,
        ipc_busy_loop_s=settings.engine_ipc_busy_loop_s,
    )


def model_folder(settings: Settings, spec: LLMSpec) -> Path:
    """The base model's folder: the settings' override, else ``llm.json``'s model (resolved offline)."""
    return resolve_model(base_model(settings, spec), settings.model_cache)


def supervised_engines(settings: Settings, spec: LLMSpec, jobs: dict[str, JobWeights]) -> list[SupervisedEngine]:
    """One engine per distinct model folder, with the jobs it serves; one that only generates preferences in
    the background runs niced (``preference_engine_nice``)."""
    engines = []
    for folder in dict.fromkeys(w.model for w in jobs.values()):
        served = tuple(job for job, w in jobs.items() if w.model == folder)
        lora = any(jobs[job].lora is not None for job in served)
        nice = settings.preference_engine_nice if "rerank" not in served else 0
        engines.append(SupervisedEngine(engine_config(settings, spec, folder, lora), served, nice=nice))
    return engines


def restart_policy(settings: Settings) -> RestartPolicy:
    return RestartPolicy(
        backoff_s=settings.engine_restart_backoff_s,
        backoff_max_s=settings.engine_restart_backoff_max_s,
        max_failures=settings.engine_restart_max_failures,
    )


# ---- the engine tier ---------------------------------------------------------------------------------


def adapter_files(spec: LLMSpec, manifest: dict[str, Any], job: str) -> tuple[tuple[str, str], ...]:
    """The checksums of ``job``'s adapter files in the run's manifest (empty when the job runs the base model)."""
    if spec.adapters.get(job) is None:
        return ()
    files = manifest.get("files", {})
    return tuple(sorted((name, str(digest)) for name, digest in files.items() if name.startswith(f"adapters/{job}/")))


def base_model(settings: Settings, spec: LLMSpec) -> str:
    return str(settings.llm_model) if settings.llm_model else spec.base_model


def served_name(settings: Settings, spec: LLMSpec, manifest: dict[str, Any], job: str) -> str:
    """``{job}-{digest}``: the name a server gives ``job``'s weights for this run (the same on both sides)."""
    content = json.dumps([base_model(settings, spec), adapter_files(spec, manifest, job)])
    return f"{job}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def remote_targets(
    settings: Settings, spec: LLMSpec, manifest: dict[str, Any], jobs: list[str]
) -> tuple[dict[str, str], list[tuple[RemoteTarget, tuple[str, ...]]]]:
    """With remote engines: each job's served name, and each server with the jobs sent to it (one engine for the
    jobs of one URL, as in process for one set of weights). Both empty: in-process engines."""
    urls = settings.engine_urls()
    if not urls:
        return {}, []
    key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
    names = {job: served_name(settings, spec, manifest, job) for job in jobs}
    servers = []
    for url in dict.fromkeys(urls[job] for job in jobs):
        sent = tuple(job for job in jobs if urls[job] == url)
        servers.append((RemoteTarget(url, tuple(names[job] for job in sent), key, settings.engine_wait_s), sent))
    return names, servers


@dataclass(frozen=True)
class ServerPlan:
    """What one ``vllm serve`` process serves: a model folder under names, and LoRA modules on it."""

    model: Path
    names: list[str]
    loras: dict[str, str]


def server_plan(
    settings: Settings, spec: LLMSpec, manifest: dict[str, Any], jobs: list[str], model_dir: Path
) -> ServerPlan:
    """The server for ``jobs`` of a run: one model folder (merged adapters: the job's merged weights; lora: the
    base with the adapters as LoRA modules). Jobs whose merged weights differ need a server each (``--job``)."""
    weights = served_jobs(settings, spec, model_dir, jobs=jobs)
    folders = sorted({str(w.model) for w in weights.values()})
    if len(folders) > 1:
        raise ValueError(
            f"the jobs {sorted(weights)} run on different merged weights ({len(folders)} folders): start one server "
            "per job (--job rerank, --job preference), or one with DPO4REC_LLM_ADAPTERS=lora"
        )
    names, loras = [], {}
    for job, w in weights.items():
        name = served_name(settings, spec, manifest, job)
        if w.lora is not None:
            loras[name] = str(w.lora)
        else:
            names.append(name)
    return ServerPlan(Path(folders[0]), names, loras)


def engine_command(settings: Settings, run: Path, job: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` for ``job`` ("rerank", "preference", or "all": the jobs the service runs) of the run (a run
    directory or a run root's ``current``), with the in-process engine's settings; and the variables to add to its
    environment. Merges adapters first where needed (cached, as the service does)."""
    from llm.serve import serve_command
    from rundir.manifest import read_manifest
    from rundir.spec import load_llm_spec
    from rundir.versions import resolve

    root = resolve(run).resolve()
    spec, manifest = load_llm_spec(root, []), read_manifest(root)
    if job == "all":
        jobs = llm_jobs(settings, spec)
    elif job in JOBS:
        jobs = [job]
    else:
        raise ValueError(f"unknown job {job!r}: rerank, preference or all")
    plan = server_plan(settings, spec, manifest, jobs, model_folder(settings, spec))
    cfg = engine_config(settings, spec, plan.model, lora=bool(plan.loras))
    key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
    env: dict[str, str] = {"OMP_WAIT_POLICY": str(cfg.omp_wait_policy)} if cfg.omp_wait_policy else {}
    if cfg.ipc_busy_loop_s is not None:
        from llm.vllm_plugin import ENV_IPC_BUSY_LOOP_S

        env[ENV_IPC_BUSY_LOOP_S] = str(cfg.ipc_busy_loop_s)
    return serve_command(cfg, plan.names, host, port, plan.loras, key), env
