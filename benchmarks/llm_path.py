"""The LLM path under open-loop load, next to the bare engine on the same prompts at the same arrivals (issue 26).

One run, on one machine, levels interleaved: at each rate the service, then the bare engine on the prompts the service
built (a drift of the machine's speed over minutes falls on both sides of each ratio):

1. **The service** (``dpo4rec serve`` on the run, ``DPO4REC_FUSION_WEIGHT`` > 0 so every warm re-rank calls the
   LLM, in-process engines as served): ``benchmarks.open_loop`` arrivals (Poisson unless ``--burstiness``) of
   ``POST /rerank`` for the run's users, each request with its own recent history (6-12 catalog items), so each
   prompt is new to the prefix cache past the user's preference, and each preference a cache hit (no background
   generation: a miss is measured apart, step 3). Goodput = LLM-scored answers inside the deadline per second.
2. **The bare engine**: an ``AsyncLLM`` in this process with the service's re-rank engine configuration and
   weights (``service.engines``), sent the very prompts the service built for each request (rebuilt from its
   answer with the service's ``RerankPromptBuilder``: ``benchmarks.service_bench.PromptBuilder``) at the same
   arrival times, each request's candidate orders at once, cancelled at the deadline as the service cancels
   its own. Its rate at the SLO is the highest offered rate whose p99 (a miss counts as infinitely late) is
   inside the deadline: MLPerf's server-scenario score.
3. **A cache miss against a hit**, at one low rate (``--miss-rate``): new users (their first request answers
   with the history stand-in and starts a background generation) and the run's users (hits) alternate; p50 of
   each, from the same level.

Printed and written (``--out``): per rate and side, offered/achieved rate, p50/p90/p99/p99.9 of all answers,
goodput, shed/timeout shares, prefix-cache hit rate of the service's engine, CPU seconds of every process (the
service's tree by name, this process with its engine core, the generator); the headline ratio service goodput
/ bare rate at the SLO (aim >= 0.9), p99 of all answers against the deadline + 50 ms up to 1.5x the bare
capacity, and the miss/hit p50 ratio (aim <= 1.2). From the repository root::

    python -m benchmarks.llm_path --run runs/tiny --rates 2,3,4,5,6,7 --duration 30 \\
        --out benchmarks/results/llm_path.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.open_loop import LoadConfig, Poster, Shot, arrival_times, measure_level, summarize
from benchmarks.service_bench import (
    Job,
    PromptBuilder,
    Sample,
    counter_deltas,
    percentile,
    score_job,
    scrape,
    to_jsonable,
    write_summary,
)
from benchmarks.support import ENV_DEFAULTS, Server, cpu_between, cpu_flags, free_port, load_now, machine, tree_cpu

for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


class AnswerPoster(Poster):
    """A ``Poster`` that keeps every 2xx answer's body, by request body: the prompts of the bare side are rebuilt
    from them, and the miss/hit phase reads each answer's ``preference_source``."""

    def __init__(self, cfg: LoadConfig):
        super().__init__(cfg)
        self.answers: dict[bytes, dict[str, Any]] = {}
        self.sources: dict[bytes, tuple[str | None, dict[str, float]]] = {}  # body -> (preference_source, timings)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        status, content = await super().post(body)
        if 200 <= status < 300:
            try:
                answer = json.loads(content)
            except ValueError:
                answer = {}
            self.sources[body] = (answer.get("preference_source"), answer.get("timings_ms") or {})
            if answer.get("prompt_tokens") is not None or body not in self.answers:
                self.answers[body] = answer  # an LLM-scored answer carries the prompts the bare side must send
        return status, content


def bodies_for(run: Path, users: Sequence[str], n: int, seed: int, top_n: int, deadline_ms: float) -> list[bytes]:
    """``n`` requests for ``users`` (cycled), each with its own recent history of 6-12 catalog items."""
    from rundir.reader import read_catalog

    ids = read_catalog(run).item_ids
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = {
            "user_id": users[i % len(users)],
            "history": rng.sample(ids, rng.randint(6, 12)),
            "top_n": top_n,
            "explain": True,  # the answer carries the preference text: its prompt can be rebuilt
            "deadline_ms": deadline_ms,
        }
        out.append(json.dumps(body).encode())
    return out


def sample_of(body: bytes, answer: dict[str, Any]) -> Sample:
    request = json.loads(body)
    return Sample(
        user_id=request["user_id"],
        status=200,
        latency_ms=float("nan"),
        started_s=0.0,
        timings_ms=answer.get("timings_ms") or {},
        degraded=list(answer.get("degraded") or []),
        prompt_tokens=answer.get("prompt_tokens"),
        source=answer.get("preference_source"),
        preference=answer.get("preference"),
        results=answer.get("results") or [],
        history=request.get("history"),
    )


# ---- the bare engine under the same arrivals ---------------------------------------------------------------


async def bare_level(
    engine: Any, lora: Any, jobs: Sequence[Job | None], rate: float, cfg: LoadConfig, seed: int
) -> dict[str, Any]:
    """Request ``i`` (``jobs[i]``: all its candidate orders at once) leaves at the i-th arrival of the level's
    schedule, never waiting on answers; one that has not finished by the deadline (from its scheduled time) is
    cancelled, which aborts it in vLLM, and counts as a miss."""
    offsets = arrival_times(rate, cfg.duration_s, cfg.burstiness, seed)
    shots = [Shot(scheduled_s=offset) for offset in offsets]
    deadline_s = cfg.slo_ms / 1000

    async def one(i: int, start: float) -> None:
        shot, job = shots[i], jobs[i]
        shot.lag_ms = (time.perf_counter() - start - shot.scheduled_s) * 1000
        shot.status = 200  # as the service answers when its LLM stage runs out of time: no LLM score
        if job is None:
            shot.error = "no prompt (the service's answer did not cover its re-ranked head)"
            return
        left = start + shot.scheduled_s + deadline_s - time.perf_counter()
        try:
            await asyncio.wait_for(score_job(engine, job, lora, f"bare-{uuid.uuid4().hex[:8]}"), max(left, 1e-3))
        except asyncio.TimeoutError:
            shot.degraded = ["llm_timeout"]
            shot.latency_ms = cfg.slo_ms
            return
        shot.latency_ms = (time.perf_counter() - start - shot.scheduled_s) * 1000
        shot.prompt_tokens = job.prompt_tokens

    cpu_before, wall_before = tree_cpu(os.getpid()), time.perf_counter()
    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, start)))
    await asyncio.gather(*tasks)
    span_s = time.perf_counter() - wall_before
    level = summarize(rate, shots, cfg, span_s)
    level["timeout_share"] = sum(1 for s in shots if "llm_timeout" in s.degraded) / max(1, len(shots))
    level["cpu_s"] = {f"bench:{k}": v for k, v in cpu_between(cpu_before, tree_cpu(os.getpid())).items()}
    return level


# ---- the run ------------------------------------------------------------------------------------------------


def _brief(level: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "rate", "sent", "offered_rps", "achieved_rps", "goodput_rps", "p99_good_ms", "meets_slo", "latency_ms",
        "shed_share", "llm_scored_share", "error_share", "http_429_share", "degraded", "statuses", "send_lag_ms",
        "timeout_share", "generator_cpu_s", "generator_cpu_ms_per_request", "engine", "cpu_s",
    )  # fmt: skip
    out = {key: level[key] for key in keys if key in level}
    if "other_cpu_s" in level:
        out["cpu_s"] = {f"service:{k}": v for k, v in level["other_cpu_s"].items()}
    return out


def _print(side: str, level: dict[str, Any]) -> None:
    lat = level["latency_ms"]
    cpu = sum(level.get("cpu_s", {}).values())
    print(
        f"[{side:>7}] {level['rate']:g} req/s: goodput {level['goodput_rps']:.2f}/s, p50 {lat['p50']:.0f} ms, "
        f"p99 {lat['p99']:.0f} ms, scored {level['llm_scored_share']:.2f}, shed {level['shed_share']:.2f}, "
        f"CPU {cpu:.1f} s",
        flush=True,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from llm.engine import async_engine, make_lora
    from rundir.reader import read_users
    from rundir.spec import load_llm_spec
    from service.engines import engine_config, model_folder, rerank_k, served_jobs
    from service.settings import Settings

    os.environ["DPO4REC_FUSION_WEIGHT"] = f"{args.weight:g}"  # the service and the bare side score alike
    run_dir = args.run.resolve()
    settings = Settings(run_dir=run_dir)  # type: ignore[call-arg]
    spec = load_llm_spec(run_dir, [])
    k = rerank_k(settings, spec)
    model_dir = model_folder(settings, spec)
    weights = served_jobs(settings, spec, model_dir).get("rerank")
    if weights is None:
        raise SystemExit("no re-rank engine at this weight: give --weight > 0")
    builder = PromptBuilder(run_dir, settings, spec, model_dir)
    users = sorted(read_users(run_dir))
    random.Random(args.seed).shuffle(users)
    cfg = LoadConfig(
        url="", duration_s=args.duration, slo_ms=args.deadline_ms, llm=True, burstiness=args.burstiness,
        timeout_s=args.deadline_ms / 1000 + 10, stop_factor=0, seed=args.seed,
    )  # fmt: skip
    report: dict[str, Any] = {
        "command": [sys.executable, "-m", "benchmarks.llm_path", *sys.argv[1:]],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "cpu_flags": cpu_flags()},
        "run": str(args.run),
        "weight": args.weight,
        "deadline_ms": args.deadline_ms,
        "rerank_k": k,
        "permutations": builder.scoring.permutations,
        "load": [load_now("start")],
        "levels": [],
    }
    args.work.mkdir(parents=True, exist_ok=True)
    services = [Side(f"service_nice{n}" if len(args.api_nice) > 1 else "service", n) for n in args.api_nice]
    try:
        for side in services:  # all started first, so no engine start falls into a level
            side.server = Server(
                args.run, free_port(), args.work / f"{side.name}.log",
                {**ENV_DEFAULTS, "DPO4REC_RELOAD_POLL_S": "null", "DPO4REC_API_NICE": str(side.nice)},
            )  # fmt: skip
            side.server.start()
            side.client = httpx.AsyncClient(base_url=side.server.base_url)
            report[f"{side.name}_ready_s"] = await side.server.wait_ready(side.client, 900)
            side.poster = AnswerPoster(replace(cfg, url=side.server.base_url))
        first = services[0].poster
        assert first is not None
        engine_cfg = engine_config(settings, spec, weights.model, weights.lora is not None)
        lora = make_lora("rerank", weights.lora, lora_id=1) if weights.lora is not None else None
        async with async_engine(engine_cfg) as engine:
            # warm-up: every user once on each side, one at a time (their preferences and system prompt cached)
            warm = bodies_for(run_dir, users, len(users), args.seed + 1000, k, args.deadline_ms)
            for side in services:
                assert side.poster is not None
                for body in warm:
                    await side.poster.post(body)
            for body in warm:
                job = builder.job(sample_of(body, first.answers.get(body, {})))
                if job is not None:
                    await score_job(engine, job, lora, f"warm-{uuid.uuid4().hex[:8]}")
            report["load"].append(load_now("sweep start"))
            for i, rate in enumerate(args.rates if not args.only_miss_hit else []):
                n = len(arrival_times(rate, cfg.duration_s, cfg.burstiness, args.seed + i))
                bodies = bodies_for(run_dir, users, n, args.seed + i, k, args.deadline_ms)
                row: dict[str, Any] = {"rate": rate}
                order = services if i % 2 == 0 else services[::-1]  # the services' order alternates
                for side in order:
                    await asyncio.sleep(args.pause_s)
                    before = await scrape(side.client)
                    assert side.poster is not None
                    cpu = functools.partial(tree_cpu, side.pid)
                    level, _ = await measure_level(side.poster, rate, bodies, cfg, args.seed + i, cpu)
                    level["engine"] = counter_deltas(before, await scrape(side.client))
                    row[side.name] = _brief(level)
                    _print(side.name, row[side.name])
                await asyncio.sleep(args.pause_s)  # then the bare engine, on the prompts the first service built
                jobs = [builder.job(sample_of(b, first.answers[b])) if b in first.answers else None for b in bodies]
                row["bare"] = _brief(await bare_level(engine, lora, jobs, rate, cfg, args.seed + i))
                _print("bare", row["bare"])
                report["levels"].append(row)
            report["load"].append(load_now("sweep done"))
            for side in services:
                assert side.poster is not None
                report[f"miss_hit_{side.name}"] = await miss_hit(side.poster, run_dir, users, cfg, args, k)
    finally:
        for side in services:
            if side.poster is not None:
                await side.poster.aclose()
            if side.client is not None:
                await side.client.aclose()
            if side.server is not None:
                side.server.stop()
    if report["levels"]:
        report["headline"] = {side.name: headline(report, side.name, args.deadline_ms) for side in services}
    return report


@dataclass
class Side:
    """One service under test: its name in the report, the API niceness it runs at, and its process and clients."""

    name: str
    nice: int
    server: Server | None = None
    client: Any = None
    poster: AnswerPoster | None = None

    @property
    def pid(self) -> int:
        return self.server.proc.pid if self.server is not None and self.server.proc is not None else 0


async def miss_hit(
    poster: AnswerPoster, run: Path, users: Sequence[str], cfg: LoadConfig, args: argparse.Namespace, k: int
) -> dict[str, Any]:
    """New users (misses) and the run's users (hits) alternating at ``--miss-rate`` for ``--miss-duration`` s:
    the p50 of each from the same level (a miss answers with the history stand-in, its generation starts after
    the answer)."""
    offsets = arrival_times(args.miss_rate, args.miss_duration, cfg.burstiness, args.seed + 99)
    hits = bodies_for(run, users, len(offsets), args.seed + 99, k, args.deadline_ms)
    bodies = []
    for i, body in enumerate(hits):
        if i % 2 == 0:
            request = json.loads(body) | {"user_id": f"new-{args.seed}-{uuid.uuid4().hex[:10]}"}
            body = json.dumps(request).encode()
        bodies.append(body)
    from benchmarks.open_loop import send_level

    poster.sources.clear()
    shots, _ = await send_level(poster, bodies, offsets, cfg.drain_cap_s)
    kinds: dict[str, list[float]] = {"miss": [], "hit": []}
    stages: dict[str, list[dict[str, float]]] = {"miss": [], "hit": []}
    scored: dict[str, int] = {"miss": 0, "hit": 0}
    for i, shot in enumerate(shots):
        if not shot.ok or shot.latency_ms is None or bodies[i] not in poster.sources:
            continue
        source, timings = poster.sources[bodies[i]]
        kind = {"history": "miss", "cache": "hit", "run": "hit"}.get(source or "")
        if kind:
            kinds[kind].append(shot.latency_ms)
            stages[kind].append(timings)
            scored[kind] += int(shot.prompt_tokens is not None)
    out: dict[str, Any] = {"rate": args.miss_rate, "duration_s": args.miss_duration}
    for kind, values in kinds.items():
        out[kind] = {
            "n": len(values),
            "llm_scored": scored[kind],
            "p50_ms": statistics.median(values) if values else None,
            "p90_ms": percentile(values, 90) if values else None,
            # the service's own stage times (timings_ms of the answers), median per stage: where a miss's time goes
            "stage_p50_ms": {
                stage: statistics.median(t[stage] for t in stages[kind] if stage in t)
                for stage in sorted({k for t in stages[kind] for k in t})
            },
        }
    if out["miss"]["p50_ms"] and out["hit"]["p50_ms"]:
        out["miss_over_hit_p50"] = out["miss"]["p50_ms"] / out["hit"]["p50_ms"]
    print(f"[miss/hit] {json.dumps(out)}", flush=True)
    return out


def headline(report: dict[str, Any], name: str, deadline_ms: float) -> dict[str, Any]:
    """Service goodput against the bare engine's rate at the SLO; p99 of all answers up to 1.5x that rate."""
    levels = [{**row, "service": row[name]} for row in report["levels"]]
    bare_at_slo = max((row["rate"] for row in levels if row["bare"]["meets_slo"]), default=None)
    bare_best = max(row["bare"]["goodput_rps"] for row in levels)
    service_best = max(row["service"]["goodput_rps"] for row in levels)
    service_at_slo = max((row["rate"] for row in levels if row["service"]["meets_slo"]), default=None)
    capacity = bare_at_slo or bare_best
    tail_rows = [
        {"rate": row["rate"], "p99_ms": row["service"]["latency_ms"]["p99"]}
        for row in levels
        if row["rate"] <= 1.5 * capacity
    ]
    out = {
        "bare_rate_at_slo_rps": bare_at_slo,
        "bare_best_goodput_rps": bare_best,
        "service_best_goodput_rps": service_best,
        "service_rate_at_slo_rps": service_at_slo,
        "goodput_over_bare_rate_at_slo": service_best / capacity if capacity else None,
        "goodput_ratio_per_rate": [
            row["service"]["goodput_rps"] / row["bare"]["goodput_rps"] if row["bare"]["goodput_rps"] else None
            for row in levels
        ],
        "p99_all_answers_up_to_1_5x": tail_rows,
        "p99_within_deadline_plus_50ms": all(r["p99_ms"] <= deadline_ms + 50 for r in tail_rows),
        "miss_over_hit_p50": report.get(f"miss_hit_{name}", {}).get("miss_over_hit_p50"),
    }
    print(f"[headline {name}] {json.dumps(to_jsonable(out))}", flush=True)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run directory (or root) to serve")
    p.add_argument("--weight", type=float, default=1.0, help="fusion weight: > 0 so every re-rank calls the LLM")
    p.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",") if x], default=[2, 3, 4, 5, 6, 7])
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per level and side")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    p.add_argument("--deadline-ms", type=float, default=3000.0, help="request deadline = the goodput SLO")
    p.add_argument("--pause-s", type=float, default=3.0, help="idle before each level (engine polls settle)")
    p.add_argument("--miss-rate", type=float, default=1.0, help="req/s of the miss/hit phase")
    p.add_argument("--miss-duration", type=float, default=60.0, help="seconds of the miss/hit phase")
    p.add_argument(
        "--api-nice", type=lambda t: [int(x) for x in t.split(",") if x], default=[0],
        help="DPO4REC_API_NICE of each service to measure, comma-separated (0: as served since 2026-12-06)",
    )  # fmt: skip
    p.add_argument("--only-miss-hit", action="store_true", help="no sweep: the miss/hit phase alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/dpo4rec-llm-path"), help="the service's log")
    p.add_argument("--out", type=Path, help="JSON summary (no per-request rows)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    if args.out:
        write_summary(args.out, result)


if __name__ == "__main__":
    main()
