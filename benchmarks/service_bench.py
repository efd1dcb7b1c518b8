"""End-to-end benchmark of the re-ranking service on one run directory, in one run on one machine.

From the repository root:

    python -m benchmarks.service_bench --run runs/small3 --fusion-weight 1 --out benchmarks/results/service.json

What users feel, at the service's own deadline (3 s unless ``--deadline-ms``), in this order (the LLM
phases never overlap, so they do not share the CPU):

1. starts the real service as a subprocess (``python -m dpo4rec.cli serve --run DIR``: uvicorn, embedded
   Redis, the in-process vLLM engines of ``service.runtime``) and waits for ``GET /readyz``;
2. warm-up, then ``POST /rerank`` for known users at concurrency 1, 4, 16 and 32, each level for
   ``--level-seconds`` of closed-loop traffic (every request a distinct prompt). Per level: p50/p95/p99
   latency of ALL answers; **goodput** = LLM-scored answers that met their deadline, per second; the
   shares shed (``llm_shed``: admission predicted a late finish) and timed out
   (``llm_timeout``); prompt tokens per scored answer; the engines' prefix-cache hit rate over the level
   (deltas of ``/metrics``);
3. the preference cache: a new user's first request (a miss: answered with the history stand-in while
   the LLM text is generated in the background), then, once that generation is done, the same user again
   (a hit), each pair at concurrency 1;
4. stops the service, rebuilds the very same re-rank prompts outside it (``llm.prompts`` + ``llm.labels``)
   and times ``llm.engine.ascore_labels`` on a fresh engine with the service's configuration and weights
   (``service.engines.engine_config``, ``served_jobs``): one at a time (the service's overhead at
   concurrency 1 = end-to-end / bare engine), and at concurrency 4 and 16, each a closed loop of
   ``--level-seconds`` as the service's levels (distinct prompts per level, so the prefix cache does not
   flatter a level; a 32-prompt burst read the rate off ~8 s of ramp and drain, and the best of three
   such noisy rates leans high). The bare engine's **capacity** is its best scored prompts/s
   there, and goodput is reported as a ratio to it, and to the best rate of a level whose p99 fits the
   deadline (a batch that answers after the deadline is no capacity for on-time answers);
5. starts the service again and answers the same requests of the levels in ``--repeat`` (1 and 16): the
   machine's speed drifts over minutes, so a ratio between the service and the bare engine minutes apart
   reads the drift too. Phases before and after the bare engine (A-B-A) give each ratio twice; their mean
   (``bracketed``) cancels a steady drift, and the two values show how far it moved.

A run that chose fusion weight 0 never calls the LLM; ``--fusion-weight`` sets ``DPO4REC_FUSION_WEIGHT``
so the LLM path is measured anyway. Every loop is bounded in requests and time; traffic goes to
127.0.0.1 only. Prints a table and writes a JSON summary (``--out``; the service's log next to it): rates,
percentiles, goodput, shares, CPU, the machine, the command and the date, and per-request arrays never (the
repository keeps summaries). ``--requests-log PATH`` (outside the repository) writes every request's row as
JSONL: each answer of each level, the bare engine's one-at-a-time times, and the overhead pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.support import (
    ENV_DEFAULTS,
    Server,
    cpu_between,
    free_port,
    load_now,
    machine,
    steal_between,
    tree_cpu,
)

ENGINE_GAUGE = "dpo4rec_engine_unfinished_requests"
ROOT = Path(__file__).resolve().parents[1]


# ---- measurements ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One ``POST /rerank``: what the client saw, and what the response said."""

    user_id: str
    status: int  # HTTP status, -1 for a client-side error (timeout, connection)
    latency_ms: float
    started_s: float  # since the start of its level
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None  # what the LLM scored for this answer (None: not LLM-scored)
    source: str | None = None
    preference: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    history: list[str] | None = None  # the request's history (item ids), when it sent one

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def scored(self) -> bool:
        """An answer the LLM scored (no ``llm_*`` degradation)."""
        return self.ok and not any(reason.startswith("llm_") for reason in self.degraded)

    def brief(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("results")
        row.pop("preference")
        return row


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``nan`` for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else float("nan"),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def stage_means(samples: list[Sample]) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for s in samples:
        for name, ms in s.timings_ms.items():
            stages.setdefault(name, []).append(ms)
    out = {name: statistics.fmean(v) for name, v in stages.items()}
    overhead = [s.latency_ms - s.timings_ms["total"] for s in samples if "total" in s.timings_ms]
    if overhead:
        out["outside_pipeline"] = statistics.fmean(overhead)  # HTTP, middlewares, (de)serialisation
    return out


# ---- HTTP load --------------------------------------------------------------------------------------------


async def post_rerank(client: Any, payload: dict[str, Any], timeout_s: float, t0: float) -> Sample:
    import httpx

    begin = time.perf_counter()
    try:
        r = await client.post("/rerank", json=payload, timeout=timeout_s)
    except httpx.HTTPError as e:
        elapsed = (time.perf_counter() - begin) * 1000
        return Sample(payload["user_id"], -1, elapsed, begin - t0, error=repr(e), history=payload.get("history"))
    latency = (time.perf_counter() - begin) * 1000
    if r.status_code != 200:
        return Sample(
            payload["user_id"], r.status_code, latency, begin - t0, error=r.text[:300], history=payload.get("history")
        )
    body = r.json()
    return Sample(
        history=payload.get("history"),
        user_id=payload["user_id"],
        status=200,
        latency_ms=latency,
        started_s=begin - t0,
        timings_ms=body.get("timings_ms", {}),
        degraded=body.get("degraded", []),
        prompt_tokens=body.get("prompt_tokens"),
        source=body.get("preference_source"),
        preference=body.get("preference"),
        results=[{k: r[k] for k in ("item_id", "index", "relevance_score")} for r in body.get("results", [])],
    )


COUNTERS = (  # /metrics samples whose deltas describe a level
    "dpo4rec_engine_prefix_queries",
    "dpo4rec_engine_prefix_hits",
    "dpo4rec_engine_prompt_tokens",
    "dpo4rec_rerank_prompt_tokens_sum",
    "dpo4rec_rerank_prompt_tokens_count",
    'dpo4rec_llm_calls_total{job="rerank"}',
    'dpo4rec_llm_calls_total{job="preference"}',
)


async def scrape(client: Any) -> dict[str, float]:
    """The ``COUNTERS`` samples of ``GET /metrics`` now."""
    r = await client.get("/metrics", timeout=10.0)
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in COUNTERS:
            out[name] = float(value)
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
    queries = d["dpo4rec_engine_prefix_queries"]
    return {
        "prefix_hit_rate": d["dpo4rec_engine_prefix_hits"] / queries if queries else None,
        "engine_prompt_tokens": d["dpo4rec_engine_prompt_tokens"],
        "rerank_prompts_scored": d["dpo4rec_rerank_prompt_tokens_count"],  # "built" before 2026-12-03 (shed ones too)
        "rerank_prompt_tokens_mean": (
            d["dpo4rec_rerank_prompt_tokens_sum"] / d["dpo4rec_rerank_prompt_tokens_count"]
            if d["dpo4rec_rerank_prompt_tokens_count"]
            else None
        ),
        "llm_calls": {
            "rerank": d['dpo4rec_llm_calls_total{job="rerank"}'],
            "preference": d['dpo4rec_llm_calls_total{job="preference"}'],
        },
    }


async def watch_engine_queue(client: Any, stop: asyncio.Event, period_s: float = 1.0) -> list[float]:
    """The engine-queue gauge of ``/metrics`` once per ``period_s`` until ``stop``."""
    values: list[float] = []
    while not stop.is_set():
        try:
            r = await client.get("/metrics", timeout=5.0)
            for line in r.text.splitlines():
                if line.startswith(ENGINE_GAUGE + " "):
                    values.append(float(line.split()[1]))
        except Exception:  # a missed scrape only thins the series
            pass
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except asyncio.TimeoutError:
            pass
    return values


async def run_level(
    client: Any,
    payloads: list[dict[str, Any]],
    concurrency: int,
    budget_s: float,
    request_timeout_s: float,
    deadline_ms: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """``payloads`` sent by ``concurrency`` workers; no new request starts after ``budget_s``. With
    ``server_pid``, the CPU seconds of the service's processes (and of this client) over the level."""
    samples: list[Sample | None] = [None] * len(payloads)
    pending = iter(enumerate(payloads))
    before = await scrape(client)
    cpu_before = tree_cpu(server_pid) if server_pid else {}
    client_cpu = time.process_time()
    t0 = time.perf_counter()

    async def worker() -> None:
        for i, payload in pending:
            if time.perf_counter() - t0 > budget_s:
                return
            samples[i] = await post_rerank(client, payload, request_timeout_s, t0)

    stop = asyncio.Event()
    # the engine queue is scraped only under concurrency: at 1 it is 0 or 1, and the scrapes would add
    # their own (small) work to the level whose latency is compared with the bare engine
    watcher = asyncio.create_task(watch_engine_queue(client, stop)) if concurrency > 1 else None
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu_s = cpu_between(cpu_before, tree_cpu(server_pid)) if server_pid else {}
    cpu_s["client"] = round(time.process_time() - client_cpu, 2)
    stop.set()
    queue = await watcher if watcher is not None else []
    deltas = counter_deltas(before, await scrape(client))
    done = [s for s in samples if s is not None]
    ok = [s for s in done if s.ok]
    on_time = [s for s in ok if s.scored and s.latency_ms <= deadline_ms]
    tokens = [float(s.prompt_tokens) for s in ok if s.prompt_tokens is not None]
    degraded: dict[str, int] = {}
    for s in ok:
        for reason in s.degraded:
            degraded[reason] = degraded.get(reason, 0) + 1
    summary = {
        "concurrency": concurrency,
        "requested": len(payloads),
        "sent": len(done),
        "with_history": sum(1 for p in payloads if p.get("history")),  # earlier-time replays of a known user
        "ok": len(ok),
        "errors": len(done) - len(ok),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else float("nan"),
        "goodput_rps": len(on_time) / wall if wall > 0 else float("nan"),  # LLM-scored and within the deadline
        "scored": sum(1 for s in ok if s.scored),
        "scored_on_time": len(on_time),
        "shed_fraction": sum(1 for s in ok if "llm_shed" in s.degraded) / len(ok) if ok else float("nan"),
        "timeout_fraction": sum(1 for s in ok if "llm_timeout" in s.degraded) / len(ok) if ok else float("nan"),
        "over_deadline_50ms": sum(1 for s in ok if s.latency_ms > deadline_ms + 50),
        "prompt_tokens_per_scored": statistics.fmean(tokens) if tokens else float("nan"),
        "latency_ms": latency_summary([s.latency_ms for s in ok]),
        "latency_ms_scored": latency_summary([s.latency_ms for s in ok if s.scored]),
        "latency_ms_shed": latency_summary([s.latency_ms for s in ok if "llm_shed" in s.degraded]),
        "engine": deltas,
        "stages_ms": stage_means(ok),
        "degraded": degraded,
        "sources": {src: sum(1 for s in ok if s.source == src) for src in {s.source for s in ok}},
        "engine_queue": {"max": max(queue, default=None), "mean": statistics.fmean(queue) if queue else None},
        "error_examples": [s.error for s in done if not s.ok][:3],
        "cpu_s": cpu_s,  # "root": the API process; VLLM::*: the engines' processes; "client": this process
        "worker_cores": _worker_cores(cpu_s, wall),
    }
    return {"summary": summary, "samples": done}


def _worker_cores(cpu_s: dict[str, float], wall: float) -> float | None:
    """Cores the engines' model workers used on average over ``wall`` seconds (None: not measured)."""
    worker = [v for name, v in cpu_s.items() if name.startswith("VLLM::Worker")]
    return sum(worker) / wall if worker and wall > 0 else None


# ---- the same prompts outside the service -----------------------------------------------------------------


@dataclass
class Job:
    """One re-rank as the service built it (its prompts, one per candidate order), and the service's label
    probabilities for it."""

    user_id: str
    prompts: list[list[int]]  # token ids, one prompt per candidate order, as the service sends them
    orders: list[int]  # the cyclic shift of each (llm.scoring.shifts)
    label_ids: list[int]
    service_probs: list[float] | None  # None when the service's answer was not LLM-scored
    service_ms: float  # end-to-end latency of the request
    service_rerank_ms: float
    prompt_tokens: int = 0  # all its prompts together


class PromptBuilder:
    """Rebuilds a response's re-rank prompts with the service's own builder (``llm.rerank_prompts``, which
    ``LanguageModel.rerank_prompts`` calls): the run's candidate orders, and a miss's stand-in cut."""

    def __init__(self, run: Path, settings: Any, spec: Any, model_dir: Path):
        from transformers import AutoTokenizer

        from llm.labels import candidate_labels
        from llm.rerank_prompts import RerankPromptBuilder
        from rundir.reader import read_catalog, read_users
        from service.engines import rerank_k, served_scoring

        self.catalog = read_catalog(run)
        self.users = read_users(run)
        self.spec = spec
        self.scoring = served_scoring(settings, spec)  # with --fusion-weight, as the service scores
        self.k = rerank_k(settings, spec)
        self.cut = settings.stand_in_prompt_chars  # a miss's history stand-in, as the service cuts it
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.builder = RerankPromptBuilder(tokenizer, spec.prompt, candidate_labels(tokenizer, self.k))

    def _item(self, index: int) -> Any:
        from rundir.items import prompt_item

        return prompt_item(self.catalog[index])  # as the service's pipeline (no rating: none in a request)

    def job(self, sample: Sample) -> Job | None:
        head = sorted((r for r in sample.results if r["index"] < self.k), key=lambda r: r["index"])
        if len(head) < 2 or [r["index"] for r in head] != list(range(len(head))):
            return None  # top_n did not cover the re-ranked head
        cfg = self.spec.prompt
        if sample.history:  # the service reads the request's history, as item ids
            history = [self.catalog.index_of(i) for i in sample.history]
        else:
            history = self.users[sample.user_id]
        recent = [self._item(i) for i in history[-cfg.max_recent :]] if cfg.max_recent else []
        candidates = [self._item(self.catalog.index_of(r["item_id"])) for r in head]
        cut = self.cut if sample.source == "history" else None
        prepared = self.builder.build(sample.preference or "", recent, candidates, self.scoring.permutations, cut)
        # the service's relevance_score is the probability of the LLM's (de-biased, order-averaged) label scores
        # only when no slice fuses them with the retriever's; otherwise the check is skipped
        raw = self.scoring.weight is None and not self.scoring.slice_weights
        scored = raw and not any(reason.startswith("llm_") for reason in sample.degraded)
        return Job(
            user_id=sample.user_id,
            prompts=prepared.token_ids,
            orders=prepared.orders,
            label_ids=prepared.label_ids,
            service_probs=[float(r["relevance_score"]) for r in head] if scored else None,
            service_ms=sample.latency_ms,
            service_rerank_ms=sample.timings_ms.get("rerank", float("nan")),
            prompt_tokens=prepared.total_tokens,
        )


async def score_job(engine: Any, job: Job, lora: Any, tag: str) -> list[Any]:
    """The label log-probs (K,) of each of the job's prompts, sent at once as the service sends them."""
    from llm.engine import ascore_labels

    return await asyncio.gather(
        *(ascore_labels(engine, ids, job.label_ids, f"{tag}-{uuid.uuid4().hex[:8]}", lora) for ids in job.prompts)
    )


async def bare_engine(
    engine_cfg: Any,
    weights: Any,
    warm: list[Job],
    single: list[Job],
    batch: list[Job],
    concurrency: list[int],
    budget_s: float,
    seconds: float,
    scoring: Any,
) -> dict[str, Any]:
    """``ascore_labels`` for the same prompts on the service's re-rank engine (``service.runtime``'s config and
    weights): first ``single`` one at a time (for at most ``budget_s``), then ``batch`` split over the
    ``concurrency`` levels, each a closed loop of ``seconds``. A job is one re-rank: its prompts (one per
    candidate order) at once, and ``scoring`` (the service's) turns their label scores into probabilities."""
    import numpy as np

    from llm.engine import async_engine, make_lora
    from llm.scoring import item_logprobs, label_probabilities

    lora = make_lora("rerank", weights.lora, lora_id=1) if weights.lora is not None else None

    started = time.perf_counter()
    async with async_engine(engine_cfg) as engine:  # the service's warm-up, too
        start_s = time.perf_counter() - started
        for job in warm:  # the warm-up requests the service's engine saw before its concurrency-1 level
            await score_job(engine, job, lora, "bench-warm")
        single_ms: list[float] = []
        diffs: list[float] = []
        same_order = 0
        t0 = time.perf_counter()
        for job in single:
            if time.perf_counter() - t0 > budget_s:
                break
            begin = time.perf_counter()
            per_order = await score_job(engine, job, lora, "bench")
            single_ms.append((time.perf_counter() - begin) * 1000)
            if job.service_probs is not None:  # as LanguageModel.score and the LLM stage compute them
                logprobs = [np.asarray(x, dtype=np.float64) for x in per_order]
                probs = label_probabilities(item_logprobs(logprobs, job.orders, scoring))
                diffs.append(float(np.max(np.abs(probs - np.asarray(job.service_probs)))))
                same_order += int(np.argmax(probs) == int(np.argmax(job.service_probs)))

        concurrent = []
        per_level = len(batch) // max(len(concurrency), 1)
        for i, level in enumerate(concurrency):  # distinct prompts per level: no prefix-cache hits between them
            jobs = batch[i * per_level : (i + 1) * per_level]
            concurrent.append(await _bare_level(engine, jobs, level, lora, seconds))
    capacity = max(
        [c["throughput_rps"] for c in concurrent] + [len(single_ms) / (sum(single_ms) / 1000) if single_ms else 0.0]
    )
    return {
        "engine_start_s": start_s,
        "single": {
            "latency_ms": latency_summary(single_ms),
            "per_request_ms": single_ms,
            "throughput_rps": len(single_ms) / (sum(single_ms) / 1000) if single_ms else float("nan"),
            "max_abs_prob_diff_vs_service": max(diffs) if diffs else None,
            "same_top1_as_service": f"{same_order}/{len(diffs)}",
        },
        "concurrent": concurrent,
        "capacity_prompts_per_s": capacity,  # the best of one at a time and the concurrent levels
    }


async def _bare_level(engine: Any, jobs: list[Job], concurrency: int, lora: Any, seconds: float) -> dict[str, Any]:
    """``jobs`` on the bare engine in a closed loop of ``concurrency`` workers (as the service's levels): no new
    prompt starts after ``seconds``, and the rate counts every prompt finished over the whole wall time."""
    done: list[tuple[float, int]] = []
    pending = iter(jobs)
    cpu_before = tree_cpu(os.getpid())
    t1 = time.perf_counter()

    async def worker() -> None:
        for job in pending:
            if time.perf_counter() - t1 > seconds:
                return
            begin = time.perf_counter()
            await score_job(engine, job, lora, "bench-b")
            done.append(((time.perf_counter() - begin) * 1000, job.prompt_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t1
    cpu_s = cpu_between(cpu_before, tree_cpu(os.getpid()))  # "root": this process (the engine's client side)
    return {
        "concurrency": concurrency,
        "n": len(done),
        "ran_out_of_prompts": len(done) == len(jobs),  # the level ended before ``seconds``: a shorter window
        "wall_s": wall,
        "throughput_rps": len(done) / wall if wall > 0 else float("nan"),
        "prompt_tokens_per_s": sum(t for _, t in done) / wall if wall > 0 else float("nan"),
        "latency_ms": latency_summary([ms for ms, _ in done]),
        "cpu_s": cpu_s,
        "worker_cores": _worker_cores(cpu_s, wall),
    }


# ---- the whole run ----------------------------------------------------------------------------------------


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class UserStream:
    """Known users for the load levels, each a distinct re-rank prompt.

    First every user once as themself (no ``history`` in the request: the service reads ``users.json``).
    When a run has fewer users than requests, users come round again as "the same user at an earlier
    time": the request carries their stored history without its newest 1, 2, ... items, so retrieval,
    candidates and prompt differ while the preference (cached in Redis) is the same. Those requests share
    the system prompt and the preference text with the user's earlier prompt in the engine's prefix cache.
    """

    def __init__(self, run: Path, min_history: int = 3):
        import random

        from rundir.preferences import load_preferences
        from rundir.reader import read_catalog, read_users

        self.catalog = read_catalog(run)
        self.histories = read_users(run)
        prefs, _ = load_preferences(run)
        users = sorted((u for u, h in self.histories.items() if len(h) >= 2 and u in prefs), key=str)
        random.Random(0).shuffle(users)
        if not users:
            raise SystemExit(f"{run}: no user with a stored preference and history")
        self.users = users
        self.min_history = min_history
        self._gen = self._generate()

    def _ids(self, indices: list[int]) -> list[str]:
        return [self.catalog[int(i)].item_id for i in indices]

    def _generate(self) -> Any:
        for user in self.users:
            yield user, None
        cut = 1
        while True:
            fitting = [u for u in self.users if len(self.histories[u]) - cut >= self.min_history]
            if not fitting:
                raise SystemExit("the run's users ran out of history for distinct requests: ask for fewer requests")
            for user in fitting:
                yield user, self._ids(self.histories[user][:-cut])
            cut += 1

    def next(self) -> tuple[str, list[str] | None]:
        return next(self._gen)  # type: ignore[no-any-return]

    def new_user_history(self, i: int) -> list[str]:
        """A history for the i-th new (cache-miss) user: a long stored history cut by 20 + i (unused above)."""
        longest = sorted(self.users, key=lambda u: -len(self.histories[u]))
        user = longest[i % len(longest)]
        history = self.histories[user]
        cut = 20 + i
        return self._ids(history[:-cut] if len(history) - cut >= self.min_history else history[::-1])


async def wait_for_generations(client: Any, timeout_s: float) -> float:
    """Seconds until ``dpo4rec_preference_queue`` (background generations) is 0 again."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        r = await client.get("/metrics", timeout=10.0)
        queued = next(
            (float(line.split()[1]) for line in r.text.splitlines() if line.startswith("dpo4rec_preference_queue ")),
            0.0,
        )
        if queued == 0:
            break
        await asyncio.sleep(0.25)
    return time.perf_counter() - start


async def service_phase(
    args: argparse.Namespace, run: Path, k: int, report: dict[str, Any], replay: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The service's levels (and the cache pairs); with ``replay`` (a first phase's ``payloads``), a fresh
    service answers the same requests again at the levels of ``args.repeat``, without the cache pairs."""
    import httpx

    stream = UserStream(run)
    out: dict[str, Any] = {"levels": [], "samples": {}, "payloads": {}, "distinct_users": len(stream.users)}
    print(f"[users] {len(stream.users)} known users with a stored preference", flush=True)
    tag = " (again)" if replay is not None else ""

    def payload(user: str, history: list[str] | None = None) -> dict[str, Any]:
        # top_n = K: the response then holds exactly the re-ranked head, so the prompt can be rebuilt
        body = {"user_id": user, "top_n": k, "explain": True, "deadline_ms": args.deadline_ms}
        return body | ({"history": history} if history else {})

    def next_payload() -> dict[str, Any]:
        return payload(*stream.next())

    server = Server(run, args.port or free_port(), args.out.with_suffix(".again.server.log" if tag else ".server.log"))
    limits = httpx.Limits(
        max_connections=max(args.concurrency) + 4, max_keepalive_connections=max(args.concurrency) + 4
    )
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, trust_env=False) as client:
            out["startup_s"] = await server.wait_ready(client, args.startup_timeout_s)
            print(f"[service] ready after {out['startup_s']:.1f} s", flush=True)
            report["load"].append(load_now("service ready"))

            warm_payloads = replay["warmup"] if replay is not None else [next_payload() for _ in range(args.warmup)]
            out["payloads"]["warmup"] = warm_payloads
            warm = await run_level(
                client,
                warm_payloads,
                1,
                args.level_timeout_s,
                args.request_timeout_s,
                args.deadline_ms,
            )
            out["warmup"] = warm["summary"]
            out["samples"]["warmup"] = warm["samples"]

            for concurrency, n in zip(args.concurrency, args.requests, strict=True):
                if replay is not None and concurrency not in args.repeat:
                    continue
                payloads = replay[f"c{concurrency}"] if replay is not None else [next_payload() for _ in range(n)]
                out["payloads"][f"c{concurrency}"] = payloads
                print(f"[level{tag}] concurrency {concurrency}: {args.level_seconds:.0f} s ...", flush=True)
                pid = server.proc.pid if server.proc is not None else None
                level = await run_level(
                    client, payloads, concurrency, args.level_seconds, args.request_timeout_s, args.deadline_ms, pid
                )
                s = level["summary"]
                print(
                    f"[level{tag}] concurrency {concurrency}: {s['ok']}/{s['sent']} ok,"
                    f" p50 {s['latency_ms']['p50']:.0f} ms,"
                    f" p99 {s['latency_ms']['p99']:.0f} ms, {s['throughput_rps']:.2f} req/s, goodput"
                    f" {s['goodput_rps']:.3f}/s, shed {s['shed_fraction']:.0%}, timeout {s['timeout_fraction']:.0%},"
                    f" prefix hits {s['engine']['prefix_hit_rate'] or 0:.0%}",
                    flush=True,
                )
                out["levels"].append(s)
                out["samples"][f"c{concurrency}"] = level["samples"]
                report["load"].append(load_now(f"after concurrency {concurrency}{tag}"))
            if replay is not None:
                return out

            # preference cache: a new user's first request (miss: the history stand-in, the LLM text generated in
            # the background), then, once that generation is done, the same user again (hit: the cached text)
            misses: list[Sample] = []
            hits: list[Sample] = []
            t0 = time.perf_counter()
            for i in range(args.miss_users + 1):  # the first pair warms the generation path, not counted
                history = stream.new_user_history(i)
                new_user = f"bench-new-{uuid.uuid4().hex[:10]}"
                miss = await post_rerank(client, payload(new_user, history=history), args.request_timeout_s, t0)
                waited = await wait_for_generations(client, args.request_timeout_s)
                hit = await post_rerank(client, payload(new_user, history=history), args.request_timeout_s, t0)
                print(
                    f"[cache] {'warm-up ' if i == 0 else ''}miss {miss.latency_ms:.0f} ms ({miss.source}), "
                    f"generation done {waited:.1f} s later, hit {hit.latency_ms:.0f} ms ({hit.source})",
                    flush=True,
                )
                if i > 0:
                    misses.append(miss)
                    hits.append(hit)
                if time.perf_counter() - t0 > args.level_timeout_s:
                    break
            out["cache"] = {
                name: {
                    "latency_ms": latency_summary([s.latency_ms for s in group if s.ok]),
                    "prompt_tokens": latency_summary(
                        [float(s.prompt_tokens) for s in group if s.prompt_tokens is not None]
                    ),
                    "stages_ms": stage_means([s for s in group if s.ok]),
                    "sources": [s.source for s in group],
                    "degraded": [s.degraded for s in group],
                    "scored": sum(1 for s in group if s.scored),
                }
                for name, group in (("miss", misses), ("hit", hits))
            }
            out["samples"]["cache_miss"] = misses
            out["samples"]["cache_hit"] = hits
            r = await client.get("/metrics", timeout=10.0)
            out["metrics_tail"] = [
                line for line in r.text.splitlines() if line.startswith("dpo4rec_") and "bucket" not in line
            ]
    finally:
        report["load"].append(load_now("before service stop"))
        out["exit_code"] = server.stop()
    return out


def _ms(lat: dict[str, float]) -> str:
    return f"{lat['p50']:>8.0f}{lat['p95']:>8.0f}{lat['p99']:>8.0f}"


def print_table(report: dict[str, Any]) -> None:
    svc = report["service"]
    bare = report.get("bare_engine") or {}
    deadline = report["settings"]["deadline_ms"]
    print(f"\nservice at deadline {deadline} ms; latency of all answers (ms)")
    head = f"{'concurrency':>11}{'n':>5}{'p50':>8}{'p95':>8}{'p99':>8}{'req/s':>8}{'goodput/s':>10}{'vs cap':>8}"
    print(head + f"{'vs fit':>8}{'shed':>7}{'timeout':>8}{'tokens':>8}{'prefix hit':>11}")
    again = report.get("service_repeat", {}).get("levels", [])
    for s in [*svc["levels"], *again]:
        ratios = [s.get("goodput_vs_capacity"), s.get("goodput_vs_capacity_within_deadline")]
        vs_cap, vs_fit = (f"{r:.2f}" if r is not None else "-" for r in ratios)
        hit = s["engine"]["prefix_hit_rate"]
        hits = f"{hit:.0%}" if hit is not None else "-"
        name = f"{s['concurrency']}" + (" again" if s in again else "")
        print(
            f"{name:>11}{s['ok']:>5}{_ms(s['latency_ms'])}{s['throughput_rps']:>8.2f}"
            f"{s['goodput_rps']:>10.3f}{vs_cap:>8}{vs_fit:>8}{s['shed_fraction']:>7.0%}{s['timeout_fraction']:>8.0%}"
            f"{s['prompt_tokens_per_scored']:>8.0f}{hits:>11}"
        )
    for name in ("miss", "hit"):
        c = svc["cache"][name]
        print(f"{'cache ' + name:>11}{c['latency_ms']['n']:>5}{_ms(c['latency_ms'])}  sources {c['sources']}")
    if bare:
        one = bare["single"]
        print(f"{'bare, 1':>11}{one['latency_ms']['n']:>5}{_ms(one['latency_ms'])}{one['throughput_rps']:>8.2f}")
        for c in bare["concurrent"]:
            print(
                f"{'bare, ' + str(c['concurrency']):>11}{c['n']:>5}{_ms(c['latency_ms'])}{c['throughput_rps']:>8.2f}"
                f"  {c['prompt_tokens_per_s']:.0f} prompt tokens/s"
                + (
                    "  RAN OUT OF PROMPTS: a short level with its drain, raise --bare-concurrent-requests"
                    if c.get("ran_out_of_prompts")
                    else ""
                )
            )
        within = bare.get("capacity_within_deadline_prompts_per_s")
        print(
            f"bare engine capacity: {bare['capacity_prompts_per_s']:.3f} scored prompts/s at its best batch; "
            f"{within if within is None else f'{within:.3f}'} at the best level whose p99 fits the deadline"
        )
    for name, when in (("overhead", "before"), ("overhead_repeat", "after")):
        ratio = report.get(name)
        if ratio:
            print(
                f"end-to-end / bare engine at concurrency 1, service {when} the bare engine: median of per-request"
                f" ratios {ratio['median_ratio']:.3f}, ratio of means {ratio['ratio_of_means']:.3f} (target <= 1.10);"
                f" rerank stage / bare: {ratio['rerank_stage_ratio_of_means']:.3f}"
            )
    if report.get("bracketed"):
        both = ", ".join(f"{k} {v:.3f}" for k, v in report["bracketed"].items())
        print(f"mean of the service phases before and after the bare engine: {both}")
    loads = " | ".join(f"{e['when']}: {e['loadavg'][0]:.2f}" for e in report["load"])
    print(f"load average (1 min): {loads}")
    marks = report["load"]
    steal = [
        (b["when"], steal_between(a.get("cpu_ticks", {}), b.get("cpu_ticks", {})))
        for a, b in zip(marks, marks[1:], strict=False)
    ]
    shares = " | ".join(f"{when}: {v:.1%}" for when, v in steal if v is not None)
    print(f"CPU the hypervisor took (steal), in the span up to: {shares}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from rundir.manifest import RunDirError
    from rundir.reader import load_llm_spec, read_version
    from service.engines import engine_config, model_folder, rerank_k, served_jobs
    from service.settings import Settings

    run = args.run.resolve()
    try:
        version = read_version(run)
    except RunDirError as e:
        raise SystemExit(str(e)) from None
    settings = Settings(run_dir=run)  # type: ignore[call-arg]  (reads the same DPO4REC_* as the service)
    spec = load_llm_spec(run, [])
    k = rerank_k(settings, spec)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "run": str(args.run),
        "run_version": version,
        "machine": machine(),
        "env": {
            key: os.environ.get(key)
            for key in [*ENV_DEFAULTS, *sorted(k for k in os.environ if k.startswith("DPO4REC_"))]
        },
        "settings": {
            "rerank_k": k,
            "max_num_seqs": settings.max_num_seqs,
            "max_model_len": settings.max_model_len,
            "deadline_ms": settings.deadline_ms,
        },
        "load": [load_now("start")],
    }
    report["service"] = await service_phase(args, run, k, report)

    # ---- bare engine, with the service stopped --------------------------------------------------------
    model_dir = model_folder(settings, spec)
    builder = PromptBuilder(run, settings, spec, model_dir)
    samples = report["service"]["samples"]
    c1_key = f"c{args.concurrency[0]}"
    warm_jobs = [j for s in samples["warmup"] if s.ok and (j := builder.job(s)) is not None]
    single_src = [(s, j) for s in samples[c1_key] if s.ok and (j := builder.job(s)) is not None]
    single_jobs = [j for _, j in single_src]
    # distinct prompts for each concurrent level (the service's own, from its levels above concurrency 1)
    want = args.bare_concurrent_requests * len(args.bare_concurrency)
    batch_src = [s for level in args.concurrency[1:] for s in samples[f"c{level}"]][:want]
    batch_jobs = [j for s in batch_src if s.ok and (j := builder.job(s)) is not None]
    weights = served_jobs(settings, spec, model_dir).get("rerank")
    if weights is None:
        raise SystemExit("the service scored nothing (fusion weight 0): set --fusion-weight to measure the LLM")
    engine_cfg = engine_config(settings, spec, weights.model, weights.lora is not None)
    report["engine_config"] = engine_cfg.to_dict()
    report["prompt_tokens"] = latency_summary([float(j.prompt_tokens) for j in single_jobs + batch_jobs])
    report["load"].append(load_now("bare engine start"))
    print(f"[bare] {len(single_jobs)} prompts one at a time, {len(batch_jobs)} at concurrency {args.bare_concurrency}")
    bare = await bare_engine(
        engine_cfg,
        weights,
        warm_jobs,
        single_jobs,
        batch_jobs,
        args.bare_concurrency,
        args.level_timeout_s,
        args.level_seconds,
        builder.scoring,
    )
    report["load"].append(load_now("bare engine done"))
    report["bare_engine"] = bare
    capacity = bare["capacity_prompts_per_s"]
    # the best rate whose answers still fit the deadline: what an engine can turn into on-time answers
    fitting = [bare["single"], *bare["concurrent"]]
    bare["capacity_within_deadline_prompts_per_s"] = max(
        (c["throughput_rps"] for c in fitting if c["latency_ms"]["p99"] <= args.deadline_ms), default=None
    )
    within = bare["capacity_within_deadline_prompts_per_s"]
    orders = spec.scoring.permutations  # prompts per scored answer
    for level in report["service"]["levels"]:
        level["goodput_vs_capacity"] = level["goodput_rps"] * orders / capacity if capacity else None
        level["goodput_vs_capacity_within_deadline"] = level["goodput_rps"] * orders / within if within else None

    per_request = bare["single"]["per_request_ms"]
    pairs = list(zip(single_jobs, per_request, strict=False))
    if pairs:
        report["overhead"] = overhead([(j.user_id, j.service_ms, j.service_rerank_ms, ms) for j, ms in pairs])

    # ---- the service again, after the bare engine: the machine's speed drifts over minutes, and a ratio of
    # two phases minutes apart reads that drift; the mean of the phases before and after the bare engine
    # cancels a steady drift (an A-B-A design)
    if not args.repeat:
        return report
    first = report["service"]
    replay = {name: first["payloads"][name] for name in ["warmup", *(f"c{c}" for c in args.repeat)]}
    again = await service_phase(args, run, k, report, replay=replay)
    report["service_repeat"] = again
    for level in again["levels"]:
        level["goodput_vs_capacity"] = level["goodput_rps"] * orders / capacity if capacity else None
        level["goodput_vs_capacity_within_deadline"] = level["goodput_rps"] * orders / within if within else None
    if pairs and c1_key in again["samples"]:
        # the same requests, so the same prompts: pair each with its bare-engine time by user and history
        def key(user_id: str, history: list[str] | None) -> tuple[str, tuple[str, ...]]:
            return user_id, tuple(history or ())

        bare_ms = {key(s.user_id, s.history): ms for (s, _), ms in zip(single_src, per_request, strict=False)}
        rows = [
            (s.user_id, s.latency_ms, s.timings_ms.get("rerank", float("nan")), bare_ms[key(s.user_id, s.history)])
            for s in again["samples"][c1_key]
            if s.ok and key(s.user_id, s.history) in bare_ms
        ]
        if rows:
            report["overhead_repeat"] = overhead(rows)
    report["bracketed"] = bracketed(report)
    return report


def overhead(rows: list[tuple[str, float, float, float]]) -> dict[str, Any]:
    """End-to-end / bare engine on the same prompts: rows of (user, service ms, rerank stage ms, bare ms)."""
    return {
        "n": len(rows),
        "median_ratio": statistics.median(svc / ms for _, svc, _, ms in rows),
        "ratio_of_means": statistics.fmean(r[1] for r in rows) / statistics.fmean(r[3] for r in rows),
        "rerank_stage_ratio_of_means": statistics.fmean(r[2] for r in rows) / statistics.fmean(r[3] for r in rows),
        "per_request": [
            {"user_id": u, "service_ms": svc, "rerank_stage_ms": stage, "bare_ms": ms} for u, svc, stage, ms in rows
        ],
    }


def bracketed(report: dict[str, Any]) -> dict[str, Any]:
    """Mean of the service phases before and after the bare engine: the overhead at concurrency 1 (ratio of
    means) and goodput / capacity at each repeated level."""
    out: dict[str, Any] = {}
    pair = [report.get("overhead"), report.get("overhead_repeat")]
    if all(pair):
        out["overhead_ratio_of_means"] = statistics.fmean(o["ratio_of_means"] for o in pair)  # type: ignore[index]
    before = {lv["concurrency"]: lv for lv in report["service"]["levels"]}
    for lv in report["service_repeat"]["levels"]:
        c = lv["concurrency"]
        ratios = [before[c].get("goodput_vs_capacity") if c in before else None, lv.get("goodput_vs_capacity")]
        if None not in ratios:
            out[f"c{c}_goodput_vs_capacity"] = statistics.fmean(ratios)
            out[f"c{c}_goodput_rps"] = statistics.fmean([before[c]["goodput_rps"], lv["goodput_rps"]])
            out[f"c{c}_p99_ms"] = max(before[c]["latency_ms"]["p99"], lv["latency_ms"]["p99"])
    return out


def split_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Take every per-request array out of ``report`` (the service's samples and payloads, the bare engine's
    one-at-a-time times, the overhead pairs) and return them as rows tagged with their phase and level; the
    summary keeps how many answers each level had (``samples_answered``) and the statistics over all of them."""
    rows: list[dict[str, Any]] = []
    for phase in ("service", "service_repeat"):
        if phase not in report:
            continue
        report[phase].pop("payloads", None)
        samples = report[phase].pop("samples", {})
        report[phase]["samples_answered"] = {name: len(group) for name, group in samples.items()}
        rows += [{"phase": phase, "level": name, **to_jsonable(s)} for name, group in samples.items() for s in group]
    single = (report.get("bare_engine") or {}).get("single", {})
    rows += [{"phase": "bare_engine", "level": "single", "latency_ms": ms} for ms in single.pop("per_request_ms", [])]
    for name in ("overhead", "overhead_repeat"):
        rows += [{"phase": name, "level": "c1", **row} for row in (report.get(name) or {}).pop("per_request", [])]
    return rows


def outside_repository(path: Path) -> bool:
    return not path.resolve().is_relative_to(ROOT)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, Sample):
        return value.brief()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:  # NaN -> null
        return None
    return value


def write_summary(path: Path, report: Any) -> None:
    """A benchmark's JSON summary (``to_jsonable``), its folder made, and where it went printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(report), indent=1) + "\n")
    print(f"summary: {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run directory to serve")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/service.json"), help="JSON summary (no per-request rows)"
    )
    parser.add_argument(
        "--requests-log", type=Path, help="every request's row as JSONL (a path outside the repository; default: none)"
    )
    parser.add_argument("--port", type=int, default=0, help="service port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--concurrency", type=parse_ints, default=[1, 4, 16, 32], help="levels, comma-separated")
    parser.add_argument("--requests", type=parse_ints, default=[1000, 2000, 3000, 3000], help="most requests per level")
    parser.add_argument(
        "--level-seconds", type=float, default=30.0, help="no new request after this per level (a steady state)"
    )
    parser.add_argument(
        "--fusion-weight", type=float, default=None, help="DPO4REC_FUSION_WEIGHT for the service (None: the run's)"
    )
    parser.add_argument("--bare-concurrency", type=parse_ints, default=[4, 16], help="bare engine levels")
    parser.add_argument("--warmup", type=int, default=4, help="requests before the first level (not counted)")
    parser.add_argument(
        "--repeat",
        type=parse_ints,
        default=[1, 16],
        help="levels answered again by a fresh service after the bare engine, to bracket drift (empty: none)",
    )
    parser.add_argument("--miss-users", type=int, default=5, help="new users for the cache miss/hit pairs")
    parser.add_argument(
        "--bare-concurrent-requests",
        type=int,
        default=400,
        help="most prompts for each of the bare engine's concurrent levels (each runs --level-seconds; a level "
        "that runs out ends early and says so)",
    )
    parser.add_argument("--deadline-ms", type=int, default=3000, help="request deadline (and the service's cap)")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="client timeout of one request")
    parser.add_argument("--level-timeout-s", type=float, default=900.0, help="no new request after this per level")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0, help="wait this long for /readyz")
    args = parser.parse_args(argv)
    if args.requests_log and not outside_repository(args.requests_log):
        parser.error(f"--requests-log: per-request rows stay out of the repository ({ROOT}); pick a path outside it")
    if len(args.concurrency) != len(args.requests) or not args.concurrency:
        parser.error("--concurrency and --requests need the same number of values")
    if not set(args.repeat) <= set(args.concurrency):
        parser.error("--repeat names levels of --concurrency only")
    return args


def main() -> None:
    args = parse_args()
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # the service caps a request's deadline by its own default; let the benchmark's through
    os.environ["DPO4REC_DEADLINE_MS"] = str(args.deadline_ms)
    if args.fusion_weight is not None:
        os.environ["DPO4REC_FUSION_WEIGHT"] = str(args.fusion_weight)
    os.environ.setdefault("DPO4REC_PREFERENCE_TIMEOUT_S", str(max(60.0, args.deadline_ms / 1000 / 2)))
    os.environ.setdefault("DPO4REC_MAX_IN_FLIGHT", str(max(64, 2 * max(args.concurrency))))

    report = asyncio.run(main_async(args))
    print_table(report)
    rows = split_rows(report)
    report["requests_log"] = str(args.requests_log) if args.requests_log else None
    if args.requests_log:
        args.requests_log.parent.mkdir(parents=True, exist_ok=True)
        with open(args.requests_log, "w") as f:
            f.writelines(json.dumps(to_jsonable(row)) + "\n" for row in rows)
        print(f"per-request rows: {args.requests_log} ({len(rows)})")
    write_summary(args.out, report)


if __name__ == "__main__":
    main()
