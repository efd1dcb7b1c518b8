"""Headless load test of the re-ranking service, with an optional Redis fault drill; writes a JSON summary.

From the repository root:

    python -m loadtests.run --run runs/default --duration 60 --users 16 --max-requests 2000 \\
        --out loadtests/results/load.json [--fault-drill]

1. starts a redis-server owned by this runner (``service.redis_server.EmbeddedRedis``, a unix socket in a
   temp dir) and the service as a subprocess on 127.0.0.1 with ``DPO4REC_REDIS_URL`` pointing at it
   (``benchmarks.support.Server``; every other ``DPO4REC_*`` variable of this process reaches it too,
   e.g. ``DPO4REC_LLM_ENABLED=false``), and waits for ``GET /readyz``;
2. runs ``locust -f loadtests/locustfile.py --headless`` as a subprocess for ``--duration`` seconds
   counted from the first request the service sees (or until ``--max-requests``), with CSV files and a
   log next to ``--out``. The runner ends locust with SIGTERM (locust stops its users, letting each finish
   its request, and writes its stats). Locust's own ``-t`` is only a safety net (``--duration`` +
   ``--grace-s``): on a busy machine it was seen to end a run early by about locust's start-up time;
3. with ``--fault-drill``: once traffic flows, at 1/3 of the duration stops the redis-server and at 2/3
   starts it again on the same socket, scraping ``GET /metrics`` at those boundaries and at the end;
   per phase (before / outage / after) the JSON has the cache hits, misses and errors, degraded answers
   by reason, the ``/rerank`` status codes and whether any was a 5xx; ``recovered`` says whether cache
   hits came back after the restart;
4. stops the service with SIGTERM (graceful drain) and the redis-server, and writes the JSON: per
   scenario and in total the request and failure counts, RPS, p50/p95/p99 latency (locust's numbers),
   5xx and 429 counts, degraded answers by reason, the service's own counters over the test, the
   machine, the load average, the command line and the date.

Traffic goes to 127.0.0.1 only. The run is bounded by ``--duration``, ``--max-requests`` and locust's
``-t`` safety net. The counts and percentiles come from locust's in-process stats at test stop (the
``*.locust_stats.csv`` files are rewritten once a second and may miss the last second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.support import ENV_DEFAULTS, HOST, Server, free_port, load_now, machine

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
RERANK_ENDPOINTS = ("/rerank", "/v1/rerank")
PHASES = ("before", "outage", "after")


# ---- the service's counters ---------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """The counters the load test reads from the Prometheus text of ``GET /metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {
        "cache": {"hit": 0.0, "miss": 0.0, "error": 0.0},
        "degraded": {},
        "rerank_status": {},
        "preference_source": {},
        "generations": {},
        "rejected": {},
    }
    by_name = {
        "dpo4rec_preference_cache_lookups_total": ("cache", "result"),
        "dpo4rec_degraded_responses_total": ("degraded", "reason"),
        "dpo4rec_preference_source_total": ("preference_source", "source"),
        "dpo4rec_preference_generations_total": ("generations", "outcome"),
        "dpo4rec_rejected_requests_total": ("rejected", "reason"),
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in by_name:
                group, label = by_name[sample.name]
                out[group][sample.labels[label]] = sample.value
            elif sample.name == "dpo4rec_http_requests_total" and sample.labels.get("endpoint") in RERANK_ENDPOINTS:
                status = sample.labels["status"]
                out["rerank_status"][status] = out["rerank_status"].get(status, 0.0) + sample.value
    return out


def metrics_delta(later: dict[str, dict[str, float]], earlier: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Counter increases between two scrapes (integers), with the 5xx total of ``/rerank``."""
    out: dict[str, Any] = {}
    for group, values in later.items():
        before = earlier.get(group, {})
        out[group] = {key: round(value - before.get(key, 0.0)) for key, value in sorted(values.items())}
    out["status_5xx"] = sum(n for code, n in out["rerank_status"].items() if code.startswith("5"))
    out["any_5xx"] = out["status_5xx"] > 0
    return out


async def scrape(client: Any) -> dict[str, dict[str, float]]:
    r = await client.get("/metrics", timeout=10.0)
    r.raise_for_status()
    return parse_metrics(r.text)


# ---- locust --------------------------------------------------------------------------------------------


def locust_command(args: argparse.Namespace, host: str, csv_prefix: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate or args.users),
        "-t",
        f"{int(args.duration + args.grace_s)}s",  # a safety net: the runner stops locust at --duration
        "--stop-timeout",
        "10",  # let a user finish its request at the end instead of cutting it off
        "--host",
        host,
        "--csv",
        str(csv_prefix),
        "--only-summary",
    ]


async def wait_exit(proc: subprocess.Popen[bytes], until: float) -> bool:
    """Sleep until ``until`` (perf_counter) or until ``proc`` exits; True if it exited."""
    while time.perf_counter() < until:
        if proc.poll() is not None:
            return True
        await asyncio.sleep(0.05)
    return proc.poll() is not None


async def first_traffic(client: Any, baseline: float, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    """perf_counter when the service first counted a ``/rerank`` request from locust."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline and proc.poll() is None:
        if sum((await scrape(client))["rerank_status"].values()) > baseline:
            return time.perf_counter()
        await asyncio.sleep(0.1)
    raise RuntimeError("locust sent no request to the service; see the locust log")


def stop_locust(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()  # locust's SIGTERM handler writes its stats and the counts file
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# ---- the test ------------------------------------------------------------------------------------------


async def drive(
    args: argparse.Namespace, redis: Any, client: Any, locust_cmd: list[str], env: dict[str, str]
) -> dict[str, Any]:
    """Run locust (and the drill); the service's counters at the phase boundaries and at the end."""
    marks: dict[str, dict[str, dict[str, float]]] = {"start": await scrape(client)}
    times: dict[str, float] = {}
    drill: dict[str, Any] = {"completed": False}
    log_path = args.out.with_suffix(".locust.log")
    print(f"[locust] {' '.join(locust_cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(locust_cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())
    launched = time.perf_counter()
    try:
        t0 = await first_traffic(client, sum(marks["start"]["rerank_status"].values()), proc, args.startup_timeout_s)
        times["traffic_s"] = t0 - launched
        if args.fault_drill:
            third = args.duration / 3
            if not await wait_exit(proc, t0 + third):
                marks["outage_start"] = await scrape(client)
                times["redis_stopped_s"] = time.perf_counter() - t0
                await redis.stop()
                print(f"[drill] redis-server stopped at {times['redis_stopped_s']:.1f} s", flush=True)
                try:
                    await wait_exit(proc, t0 + 2 * third)
                    marks["outage_end"] = await scrape(client)
                finally:
                    times["redis_restarted_s"] = time.perf_counter() - t0
                    await redis.start()
                    print(f"[drill] redis-server started again at {times['redis_restarted_s']:.1f} s", flush=True)
                drill["completed"] = proc.poll() is None  # an "after" phase with traffic
            else:
                print("[drill] locust ended before the outage (request cap?): no drill", flush=True)
        ended = "locust" if await wait_exit(proc, t0 + args.duration) else "duration"  # "locust": cap or its -t
    finally:
        code = stop_locust(proc)
        times["locust_s"] = time.perf_counter() - launched
    marks["end"] = await scrape(client)
    return {"marks": marks, "times": times, "drill": drill, "exit_code": code, "log": str(log_path), "ended": ended}


def drill_report(result: dict[str, Any]) -> dict[str, Any]:
    marks, times = result["marks"], result["times"]
    if "outage_end" not in marks:
        return {**result["drill"], "recovered": None, "phases": {}}
    bounds = {
        "before": ("start", "outage_start"),
        "outage": ("outage_start", "outage_end"),
        "after": ("outage_end", "end"),
    }
    phases = {phase: metrics_delta(marks[b], marks[a]) for phase, (a, b) in bounds.items()}
    return {
        **result["drill"],
        "redis_stopped_s": round(times["redis_stopped_s"], 2),  # seconds after the first request
        "redis_restarted_s": round(times["redis_restarted_s"], 2),
        "phases": phases,
        "any_5xx": any(p["any_5xx"] for p in phases.values()),
        "cache_errors_in_outage": phases["outage"]["cache"]["error"],
        "cache_hits_after_restart": phases["after"]["cache"]["hit"],
        "recovered": phases["after"]["cache"]["hit"] > 0,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from rundir.manifest import RunDirError
    from rundir.reader import read_version
    from service.redis_server import EmbeddedRedis

    run = args.run.resolve()
    try:
        version = read_version(run)
    except RunDirError as e:
        raise SystemExit(str(e)) from None
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "loadtests.run", *sys.argv[1:]]),
        "run": str(args.run),
        "run_version": version,
        "machine": machine() | {"locust": _version("locust")},
        "settings": {
            "duration_s": args.duration,
            "users": args.users,
            "spawn_rate": args.spawn_rate or args.users,
            "max_requests": args.max_requests or None,
            "wait_s": args.wait_s,
            "fault_drill": args.fault_drill,
            "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("DPO4REC_") and "KEY" not in k},
        },
        "load": [load_now("start")],
    }
    out: Path = args.out
    counts_path = out.with_suffix(".counts.json")
    counts_path.unlink(missing_ok=True)
    redis = EmbeddedRedis()
    server = Server(run, args.port or free_port(), out.with_suffix(".server.log"), env={"DPO4REC_REDIS_URL": redis.url})
    env = {
        **os.environ,
        "DPO4REC_LOADTEST_RUN": str(run),
        "DPO4REC_LOADTEST_COUNTS": str(counts_path),
        "DPO4REC_LOADTEST_MAX_REQUESTS": str(args.max_requests),
        "DPO4REC_LOADTEST_WAIT_S": str(args.wait_s),
    }
    cmd = locust_command(args, server.base_url, out.with_name(out.stem + ".locust"))
    try:
        await redis.start()
        server.start()
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as client:
            startup = await server.wait_ready(client, args.startup_timeout_s)
            print(f"[service] ready after {startup:.1f} s", flush=True)
            report["load"].append(load_now("service ready"))
            result = await drive(args, redis, client, cmd, env)
            report["load"].append(load_now("locust done"))
    finally:
        exit_code = server.stop()
        await redis.close()
    if not counts_path.is_file():
        raise SystemExit(f"locust wrote no counts ({counts_path}); see {result['log']}")
    counts = json.loads(counts_path.read_text())
    report["service"] = {
        "startup_s": round(startup, 1),
        # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is a clean exit too; -9 was a kill
        "exit_code": exit_code,
        "stopped_cleanly": exit_code in (0, -signal.SIGTERM),
        "log": str(server.log_path),
    }
    report["locust"] = {
        "command": " ".join(cmd),
        "exit_code": result["exit_code"],  # 1 when any request failed
        "log": result["log"],
        "csv_prefix": cmd[cmd.index("--csv") + 1],
        "first_request_after_s": round(result["times"]["traffic_s"], 1),
        "ran_s": round(result["times"]["locust_s"], 1),
        "stopped_by": counts["stopped_by"] or result["ended"],  # max_requests | duration | locust
        "requests_started": counts["requests_started"],  # taken from the cap; a few may be cut off at the stop
    }
    for key in ("scenarios", "total", "status_5xx", "status_429", "connection_errors", "degraded_responses"):
        report[key] = counts[key]
    for key in ("degraded", "bad_kinds", "preference_sources"):
        report[key] = counts[key]
    report["service_metrics"] = metrics_delta(result["marks"]["end"], result["marks"]["start"])
    report["llm"] = llm_shares(report["service_metrics"], result["times"]["locust_s"])
    report["fault_drill"] = drill_report(result) if args.fault_drill else None
    return report


def llm_shares(delta: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Of the 200 answers (service counters over the test): the shares shed by admission, timed out and
    otherwise without the LLM, and the goodput (LLM-scored answers per second; the rest was shed or late)."""
    answered = delta["rerank_status"].get("200", 0)
    without = {r: n for r, n in delta["degraded"].items() if r.startswith("llm_")}
    scored = answered - sum(without.values())  # the llm_* reasons exclude each other
    return {
        "answers": answered,
        "llm_scored": scored,
        "goodput_per_s": scored / seconds if seconds > 0 else None,
        "shares": {r: n / answered for r, n in sorted(without.items())} if answered else {},
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"\n{'scenario':<14}{'requests':>9}{'failures':>9}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'req/s':>8}  status"
    )
    rows = [*report["scenarios"].items(), ("total", report["total"])]
    for name, s in rows:
        lat = s.get("latency_ms") or {}
        cells = "".join(f"{lat.get(q, float('nan')):>8.0f}" for q in ("p50", "p95", "p99"))
        status = " ".join(f"{code}:{n}" for code, n in sorted(s.get("status", {}).items()))
        print(f"{name:<14}{s['requests']:>9}{s['failures']:>9}{cells}{s['rps']:>8.2f}  {status}")
    degraded = Counter(report["degraded"])
    print(f"5xx: {report['status_5xx']}  429: {report['status_429']}  degraded answers: {dict(degraded)}")
    llm = report.get("llm") or {}
    if llm.get("answers"):
        shares = ", ".join(f"{r} {v:.0%}" for r, v in llm["shares"].items()) or "none"
        rate = llm["goodput_per_s"]
        print(f"LLM-scored answers {llm['llm_scored']}/{llm['answers']} ({rate:.2f}/s); without the LLM: {shares}")
    drill = report.get("fault_drill")
    if drill and drill.get("phases"):
        for phase in PHASES:
            p = drill["phases"][phase]
            print(f"[drill] {phase:<7} cache {p['cache']}  degraded {p['degraded']}  5xx {p['status_5xx']}")
        print(f"[drill] recovered cache use after the restart: {drill['recovered']}")
    loads = " | ".join(f"{e['when']}: {e['loadavg'][0]:.2f}" for e in report["load"])
    print(f"load average (1 min): {loads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run directory to serve")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/load.json"), help="JSON summary")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load from the first request")
    parser.add_argument("--users", type=int, default=16, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, default=0, help="users started per second (0: all at once)")
    parser.add_argument("--max-requests", type=int, default=2000, help="stop after this many requests (0: no cap)")
    parser.add_argument("--wait-s", type=float, default=0.1, help="think time of a user, uniform in [0, this]")
    parser.add_argument("--fault-drill", action="store_true", help="stop Redis at 1/3 of the run, restart at 2/3")
    parser.add_argument("--port", type=int, default=0, help="service port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0, help="wait this long for /readyz")
    parser.add_argument("--grace-s", type=float, default=60.0, help="locust's own -t is --duration + this")
    args = parser.parse_args()
    if args.duration < 1 or args.users < 1:
        parser.error("--duration and --users must be at least 1")
    if args.fault_drill and args.duration < 3:
        parser.error("--fault-drill needs --duration of at least 3 s (three phases)")

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[load test] service and locust on {HOST} only", flush=True)
    report = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_summary(report)
    print(f"summary: {args.out}")


if __name__ == "__main__":
    main()
