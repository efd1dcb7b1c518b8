"""The HTTP hop of the engine tier (issue 25): the remote engine (``vllm serve`` from ``dpo4rec engine``) against the
in-process one, on the same run, settings and prompts, in one run.

1. **One request.** The same re-rank prompts (a fresh user per prompt, so every one is a prefix-cache miss on both
   engines) scored by an in-process ``AsyncLLM`` and by ``llm.remote.RemoteEngine``, one at a time, alternating
   which goes first, ``--gap-s`` apart: an engine's core busy-polls ~1 s after its last step, and back to back
   the other engine's request ran beside that spin (p50 172 vs 401 ms in one such run, bimodal on both sides).
   Reported: p50 and mean latency of each, and the hop (remote / in-process - 1; aim <= 10 %).
2. **Goodput at the deadline, open loop.** The service started twice on the run with the LLM on
   (``DPO4REC_FUSION_WEIGHT``): in process, then with ``DPO4REC_ENGINE_URL`` (the server stopped with SIGSTOP while
   the in-process service runs, so it takes no CPU). ``benchmarks.open_loop`` sweeps the same Poisson arrival rates
   against each; goodput = LLM-scored answers inside the deadline per second. Reported per rate and at its best,
   with the ratio remote / in-process (aim >= 0.9).

On one machine both tiers share the cores, so the hop here is the HTTP and JSON cost on the same CPU that runs the
engine, which is the pessimistic case; across machines the network adds its round trip (~0.1-0.5 ms in a cluster).

    python -m benchmarks.remote_engine --run runs/tiny --weight 0.5 --rates 1,2,3,4 --duration 30 \\
        --out benchmarks/results/remote_engine.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.open_loop import LoadConfig, read_bodies, sweep
from benchmarks.service_bench import write_summary
from benchmarks.support import ENV_DEFAULTS, HOST, Server, cpu_flags, free_port, load_now, machine, tree_cpu

for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


def start_engine(run: Path, weight: float, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``dpo4rec engine``'s server for the run, waited for until ``/health`` answers."""
    from service.engines import engine_command
    from service.settings import Settings

    port = free_port()
    argv, env = engine_command(Settings(run_dir=run, fusion_weight=weight), run, "all", HOST, port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env={**env, **os.environ}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() - started > 600:
            raise RuntimeError(f"vllm serve did not start; see {log}")
        time.sleep(1.0)
    print(f"[engine] {url} up in {time.monotonic() - started:.0f} s", flush=True)
    return proc, url


def prompts(run: Path, n: int, k: int) -> tuple[list[list[int]], list[int]]:
    """``n`` re-rank prompts of ``k`` catalog candidates, each a different user, from the service's builder (one
    candidate order: the single prompt a request at ``permutations`` 1 sends)."""
    import random

    from transformers import AutoTokenizer

    from llm.labels import candidate_labels
    from llm.prompts import HistoryItem
    from llm.rerank_prompts import RerankPromptBuilder
    from rundir.reader import read_catalog
    from rundir.spec import load_llm_spec
    from service.engines import model_folder
    from service.settings import Settings

    spec = load_llm_spec(run, [])
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder(Settings(run_dir=run), spec)))
    catalog = read_catalog(run)
    labels = candidate_labels(tokenizer, k)
    builder = RerankPromptBuilder(tokenizer, spec.prompt, labels)
    rng = random.Random(0)
    out = []
    for u in range(n):
        items = [catalog[i] for i in rng.sample(range(1, len(catalog)), k + 8)]
        recent = [HistoryItem(title=it.title, rating=4.0) for it in items[k:]]
        candidates = [HistoryItem(title=it.title) for it in items[:k]]
        preference = f"User {u} {rng.random():.6f}: likes {items[0].title} and films like it."  # a new prefix
        out.append(builder.build(preference, recent, candidates).token_ids[0])
    return out, [i for _, i in labels]


SERVER_HISTOGRAMS = {
    "e2e": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "inference": "vllm:request_inference_time_seconds",
}


def server_seconds(url: str) -> dict[str, float]:
    """Sums of the server's request-time histograms (seconds) and its request count, from ``/metrics``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {key: 0.0 for key in SERVER_HISTOGRAMS} | {"e2e_count": 0.0}
    for line in text.splitlines():
        for key, name in SERVER_HISTOGRAMS.items():
            if line.startswith(name + "_sum"):
                out[key] += float(line.rsplit(" ", 1)[1])
        if line.startswith(SERVER_HISTOGRAMS["e2e"] + "_count"):
            out["e2e_count"] += float(line.rsplit(" ", 1)[1])
    return out


async def one_request(run: Path, weight: float, url: str, n: int, k: int, gap_s: float) -> dict[str, Any]:
    from llm.engine import ascore_labels, async_engine
    from llm.remote import RemoteEngine
    from rundir.manifest import read_manifest
    from rundir.spec import load_llm_spec
    from service.engines import engine_config, model_folder, served_name
    from service.settings import Settings

    settings = Settings(run_dir=run, fusion_weight=weight)
    spec = load_llm_spec(run, [])
    cfg = engine_config(settings, spec, model_folder(settings, spec), lora=False)
    token_ids, label_ids = prompts(run, n + 2, k)
    times: dict[str, list[float]] = {"in_process": [], "remote": []}
    remote = RemoteEngine(url, served_name(settings, spec, read_manifest(run), "rerank"))
    await remote.open()
    server: dict[str, float] = {}
    async with async_engine(cfg) as local:
        engines = {"in_process": local, "remote": remote}
        for i, ids in enumerate(token_ids):
            if i == 2:
                server = server_seconds(url)
            order = ["in_process", "remote"] if i % 2 == 0 else ["remote", "in_process"]
            for name in order:
                # the other engine's core polls for work ~1 s after its last step (vLLM's busy loop) on the same
                # cores: wait it out, so each request runs on cores no other engine is spinning on
                await asyncio.sleep(gap_s)
                start = time.perf_counter()
                await ascore_labels(engines[name], ids, label_ids, f"hop-{name}-{i}")
                if i >= 2:  # the first two prompts warm both paths up
                    times[name].append(1000 * (time.perf_counter() - start))
    await remote.aclose()
    after = server_seconds(url)
    out: dict[str, Any] = {"prompts": n, "candidates": k, "prompt_tokens_mean": statistics.mean(map(len, token_ids))}
    for name, values in times.items():
        out[name] = {"p50_ms": statistics.median(values), "mean_ms": statistics.mean(values), "min_ms": min(values)}
    # where the hop goes: the server's own view of its requests (vLLM's histograms), mean per request
    count = after["e2e_count"] - server["e2e_count"]
    out["server_side_mean_ms"] = {
        key: 1000 * (after[key] - server[key]) / max(count, 1) for key in ("e2e", "queue", "prefill", "inference")
    }
    out["hop_p50"] = out["remote"]["p50_ms"] / out["in_process"]["p50_ms"] - 1
    out["hop_mean"] = out["remote"]["mean_ms"] / out["in_process"]["mean_ms"] - 1
    out["hop_p50_ms"] = out["remote"]["p50_ms"] - out["in_process"]["p50_ms"]
    print(
        f"[one request] in-process p50 {out['in_process']['p50_ms']:.1f} ms, "
        f"remote p50 {out['remote']['p50_ms']:.1f} ms: hop {100 * out['hop_p50']:+.1f} % ({out['hop_p50_ms']:+.1f} ms);"
        f" the server's own mean e2e {out['server_side_mean_ms']['e2e']:.1f} ms",
        flush=True,
    )
    return out


async def goodput(
    run: Path, weight: float, mode: str, url: str | None, args: argparse.Namespace, engine_pid: int | None = None
) -> dict[str, Any]:
    import httpx

    env = {**ENV_DEFAULTS, "DPO4REC_FUSION_WEIGHT": f"{weight:g}", "DPO4REC_RELOAD_POLL_S": "null"}
    if url:
        env["DPO4REC_ENGINE_URL"] = url
    server = Server(run, free_port(), args.work / f"service-{mode}.log", env)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            ready_s = await server.wait_ready(client, 900)
        cfg = LoadConfig(
            url=server.base_url, duration_s=args.duration, slo_ms=args.deadline_ms, llm=True,
            timeout_s=args.deadline_ms / 1000 + 10, stop_factor=0, seed=args.seed,
        )  # fmt: skip
        bodies = (
            new_users(run, args.seed)
            if args.new_users
            else read_bodies(argparse.Namespace(user=[], users_from=run, seed=args.seed, top_n=10))
        )
        for body in bodies:
            body["deadline_ms"] = args.deadline_ms
        load_before = load_now(f"{mode} sweep")
        pid = server.proc.pid if server.proc else 0

        def cpu() -> dict[str, float]:  # CPU seconds by tier: the service (with its engine in process), the server
            out = {f"service:{name}": seconds for name, seconds in tree_cpu(pid).items()}
            if engine_pid is not None:
                out |= {f"server:{name}": seconds for name, seconds in tree_cpu(engine_pid).items()}
            return out

        result = await sweep(cfg, args.rates, bodies, cpu, on_level=lambda level: _level(mode, level))
        load_after = load_now(f"{mode} sweep done")
    finally:
        server.stop()
    return {
        "mode": mode,
        "ready_s": ready_s,
        "levels": [_brief(level) for level in result.levels],
        "best_goodput_rps": max(level["goodput_rps"] for level in result.levels),
        "load": [load_before, load_after],
    }


def new_users(run: Path, seed: int, n: int = 5000) -> list[dict[str, Any]]:
    """Requests of users the run does not know, each with its own history: every re-rank prompt is new to the
    prefix cache past the system prompt (the run's own users repeat within a level, and their prompts hit)."""
    import random

    from rundir.reader import read_catalog

    ids = read_catalog(run).item_ids
    rng = random.Random(seed)
    return [
        {"user_id": f"bench-{seed}-{i}", "history": rng.sample(ids, rng.randint(6, 12)), "top_n": 10} for i in range(n)
    ]


def _brief(level: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "rate", "sent", "achieved_rps", "goodput_rps", "p99_good_ms", "meets_slo", "latency_ms", "shed_share",
        "llm_scored_share", "error_share", "http_429_share", "degraded", "statuses", "send_lag_ms",
    )  # fmt: skip
    out = {key: level[key] for key in keys}
    cpu = level.get("other_cpu_s", {})
    answers = max(1, level["sent"])
    for tier in ("service", "server"):
        total = sum(v for k, v in cpu.items() if k.startswith(tier + ":"))
        if total:
            out[f"{tier}_cpu_ms_per_request"] = 1000 * total / answers
    out["cpu_s"] = cpu
    return out


def _level(mode: str, level: dict[str, Any]) -> None:
    cpu = level.get("other_cpu_s", {})
    by_tier = {t: sum(v for k, v in cpu.items() if k.startswith(t + ":")) for t in ("service", "server")}
    print(
        f"[{mode}] {level['rate']:g} req/s: goodput {level['goodput_rps']:.2f}/s, "
        f"CPU s service {by_tier['service']:.1f} server {by_tier['server']:.1f}",
        flush=True,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    engine, url = start_engine(args.run, args.weight, args.work / "engine.log")
    result: dict[str, Any] = {
        "command": [sys.executable, "-m", "benchmarks.remote_engine", *sys.argv[1:]],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "cpu_flags": cpu_flags()},
        "run": str(args.run),
        "weight": args.weight,
        "deadline_ms": args.deadline_ms,
    }
    try:
        result["load_start"] = load_now("start")
        result["one_request"] = await one_request(args.run, args.weight, url, args.single, args.candidates, args.gap_s)
        if args.rates:
            if args.remote_first:  # the other order, to see any drift of the machine between the two sweeps
                remote = await goodput(args.run, args.weight, "remote", url, args, engine.pid)
            os.killpg(engine.pid, signal.SIGSTOP)  # no CPU for the idle server while the in-process one is measured
            try:
                local = await goodput(args.run, args.weight, "in_process", None, args)
            finally:
                os.killpg(engine.pid, signal.SIGCONT)
            if not args.remote_first:
                remote = await goodput(args.run, args.weight, "remote", url, args, engine.pid)
            result["goodput"] = {
                "in_process": local,
                "remote": remote,
                "ratio_best": remote["best_goodput_rps"] / max(local["best_goodput_rps"], 1e-9),
                "ratio_per_rate": [
                    r["goodput_rps"] / max(lo["goodput_rps"], 1e-9)
                    for lo, r in zip(local["levels"], remote["levels"], strict=False)
                ],
            }
            print(
                f"[goodput] best in-process {local['best_goodput_rps']:.2f}/s, "
                f"remote {remote['best_goodput_rps']:.2f}/s: ratio {result['goodput']['ratio_best']:.2f}",
                flush=True,
            )
    finally:
        os.killpg(engine.pid, signal.SIGCONT)
        os.killpg(engine.pid, signal.SIGTERM)
        try:
            engine.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run directory (or root) to serve")
    p.add_argument("--weight", type=float, default=0.5, help="fusion weight: > 0 so every re-rank calls the LLM")
    p.add_argument("--single", type=int, default=30, help="prompts of the one-request comparison")
    p.add_argument("--gap-s", type=float, default=1.5, help="pause before each single request (engines idle)")
    p.add_argument("--candidates", type=int, default=20, help="candidates per re-rank prompt")
    p.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",") if x], default=[], help="req/s levels")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per level")
    p.add_argument("--deadline-ms", type=float, default=3000.0, help="request deadline = the goodput SLO")
    p.add_argument("--remote-first", action="store_true", help="sweep the remote engine first")
    p.add_argument("--new-users", action="store_true", help="each request a new user with its own history")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/dpo4rec-remote-engine"), help="logs")
    p.add_argument("--out", type=Path, help="JSON summary")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    if args.out:
        write_summary(args.out, result)


if __name__ == "__main__":
    main()
