"""The retrieval path at the cost of its model: ``POST /rerank`` at fusion weight 0 next to bare SASRec + FAISS.

Issue 26, item 2; SPEC section 9 ("Load is measured open-loop"). In ONE run, at each rate of one sweep:

- the service (``dpo4rec serve``, ``DPO4REC_FUSION_WEIGHT=0``: the engine is started, as served, but never
  called for scoring; only the run's users are sent, so no preference is generated) under open-loop
  arrivals (``benchmarks.open_loop``: latency from the scheduled send, misses as infinitely late);
- optionally the same service without the engine (``--engine-off``) and a service from another source
  tree (``--baseline-src DIR``, e.g. ``git archive COMMIT | tar -x -C DIR``), interleaved level by level, so
  a before/after comparison shares the machine's load of the moment (the cores here are shared: compare
  ratios, not absolute rates, across runs);
- the bare component in this process: the same run's SASRec user vector + FAISS search (the service's k,
  its excluded items, the users' precomputed preference vectors), driven by the same arrival times through
  the service's own ``Coalescer``, so it forms batches the way the service does, with no HTTP, no
  validation, no Redis, no pipeline.

The headline of each is the highest rate whose p99 (misses as infinitely late) meets the SLO; printed with
their ratio, the CPU seconds of every process per level (the server's tree by process name, this generator),
and the mean batch the coalescers formed (the service's from ``dpo4rec_retriever_batch_size`` in /metrics).
After the sweep, the bare component's CPU per answer at fixed batch sizes (those the service formed) gives
the floor of each level's CPU per answer. With ``wrk`` installed, a closed loop (16 connections, for
reference only) against each service ends the run. From the repository root::

    python -m benchmarks.retrieval_path --run runs/tiny --sweep-from 100 --duration 10 --engine-off \\
        --out benchmarks/results/retrieval_path.json

The bare phase runs at the server's niceness (the API renices itself +19 once an engine runs), so both
sides get the same share of shared cores; the generator of the service phase keeps its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.open_loop import LoadConfig, Poster, geometric_rates, measure_level
from benchmarks.service_bench import write_summary
from benchmarks.support import ENV_DEFAULTS, Server, free_port, machine

BATCH_METRIC = "dpo4rec_retriever_batch_size"


@dataclass
class Variant:
    """One service under test: its name, extra environment, and the source tree it runs from."""

    name: str
    env: dict[str, str]
    src: Path | None = None  # None: this checkout
    server: Server | None = None
    nice: int | None = None  # the API process's niceness once ready
    levels: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # its sweep ended (p99 over stop_factor x SLO)


# ---- the bare component -------------------------------------------------------------------------------


class Bare:
    """SASRec user vectors + FAISS top-k of the run's users, batched by the service's ``Coalescer``; it
    stands in for ``open_loop.Poster`` (``post(body) -> (status, content)``), the body being a user id."""

    errors: tuple[type[BaseException], ...] = (ValueError, RuntimeError)

    def __init__(self, run: Path, k: int, torch_threads: int | None):
        import torch

        from rundir.reader import load_artifacts
        from service.batching import Coalescer

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # the service's setting (torch_threads)
        artifacts = load_artifacts(run, False)
        self.retriever, self.index = artifacts.retriever, artifacts.index
        self.max_len = self.retriever.cfg.max_len
        self.k = k
        self.users: dict[bytes, tuple[list[int], np.ndarray, set[int]]] = {
            user.encode(): (
                history[-self.max_len :],
                artifacts.preference_vectors[artifacts.preference_rows[user]],
                set(history) | artifacts.retired,
            )
            for user, history in artifacts.users.items()
            if user in artifacts.preference_rows
        }
        self.coalescer = Coalescer(self.search_many)  # as the service batches: a worker thread per batch
        for users in (list(self.users.values())[:1], list(self.users.values())[:8]) * 20:  # torch's first calls
            self.search_many(users)

    def search_many(self, users: Sequence[tuple[list[int], np.ndarray, set[int]]]) -> list[np.ndarray]:
        vectors = self.retriever.user_vectors([u[0] for u in users], np.stack([u[1] for u in users]))  # (B, H)
        _, items = self.index.search(vectors, self.k, exclude=[u[2] for u in users])  # (B, k)
        return list(items)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        await self.coalescer(self.users[body])
        return 200, b"{}"

    async def aclose(self) -> None:
        pass

    def cost_by_batch(self, sizes: Sequence[int], seconds: float = 2.0) -> dict[int, dict[str, float]]:
        """CPU ms per batch and per answer of ``search_many`` at fixed batch sizes (a closed loop, no waits)."""
        users = list(self.users.values())
        out = {}
        for b in sizes:
            batch = [users[i % len(users)] for i in range(b)]
            self.search_many(batch)  # warm
            n, cpu, start = 0, time.process_time(), time.perf_counter()
            while time.perf_counter() - start < seconds:
                self.search_many(batch)
                n += 1
            per_batch = (time.process_time() - cpu) * 1000 / n
            out[b] = {"cpu_ms_per_batch": round(per_batch, 4), "cpu_ms_per_answer": round(per_batch / b, 4)}
        return out


@contextmanager
def niceness(value: int | None) -> Iterator[int]:
    """Run this thread at ``value`` (None: as it is), then restore; yields the niceness in effect."""
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    if value is not None and value != before:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, value)
        except PermissionError:  # lowering it back needs CAP_SYS_NICE: then stay as we are
            value = before
    try:
        yield os.getpriority(os.PRIO_PROCESS, tid)
    finally:
        if os.getpriority(os.PRIO_PROCESS, tid) != before:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)
            except PermissionError:
                print(f"[bare] cannot restore niceness {before}: later levels run niced", flush=True)


# ---- the services ---------------------------------------------------------------------------------------


def batch_stats(text: str) -> tuple[float, float]:
    """(sum, count) of the retriever batch size histogram in a /metrics page; (0, 0) when absent."""
    found = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{BATCH_METRIC}_(sum|count) (\S+)$", text, re.M)}
    return found.get("sum", 0.0), found.get("count", 0.0)


async def scrape(url: str) -> str | None:
    """The service's /metrics page; None when it does not answer (a stalled machine: the level goes on)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        try:
            return (await client.get("/metrics", timeout=30.0)).text
        except httpx.HTTPError as e:
            print(f"[metrics] {url}: {type(e).__name__}", flush=True)
            return None


async def service_level(variant: Variant, rate: float, bodies: list[bytes], cfg: LoadConfig, seed: int) -> dict:
    from benchmarks.support import tree_cpu

    assert variant.server is not None and variant.server.proc is not None
    pid = variant.server.proc.pid
    before = await scrape(variant.server.base_url)
    poster = Poster(LoadConfig(**{**asdict(cfg), "url": variant.server.base_url}))
    try:
        level, _ = await measure_level(poster, rate, bodies, cfg, seed, lambda: tree_cpu(pid))
    finally:
        await poster.aclose()
    after = await scrape(variant.server.base_url)
    level["mean_batch"] = None
    if before is not None and after is not None:
        (sum_before, n_before), (sum_after, n_after) = batch_stats(before), batch_stats(after)
        if n_after > n_before:
            level["mean_batch"] = (sum_after - sum_before) / (n_after - n_before)
    level["loadavg_1m"] = os.getloadavg()[0]  # the machine's, other jobs included
    return level


def brief(level: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps of a level (open_loop's numbers, no per-request rows)."""
    keep = ("rate", "sent", "achieved_rps", "latency_ms", "p99_good_ms", "meets_slo", "goodput_rps", "error_share")
    out = {k: level[k] for k in keep}
    out |= {k: level.get(k) for k in ("http_429_share", "send_lag_ms", "generator_cpu_s", "mean_batch", "loadavg_1m")}
    out["ok_rps"] = level["statuses"].get("200", 0) / level["span_s"]  # 200s per second, the drain included
    server = level.get("other_cpu_s") or {}
    out["server_cpu_s"] = server
    out["server_cpu_ms_per_answer"] = 1000 * sum(server.values()) / level["sent"] if server else None
    out["generator_cpu_ms_per_request"] = level["generator_cpu_ms_per_request"]
    return out


def wrk_closed_loop(url: str, users: Sequence[str], top_n: int, seconds: int = 10) -> dict[str, Any] | None:
    """``wrk -t2 -c16`` against ``POST /rerank`` (a closed loop: reference only); None without wrk."""
    if shutil.which("wrk") is None:
        return None
    bodies = ",".join("[[" + json.dumps({"user_id": u, "top_n": top_n}) + "]]" for u in users)
    script = (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{{bodies}}}\nlocal i = 0\n"
        "request = function()\n  i = i + 1\n  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\nend\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(script)
        f.flush()
        command = ["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", f.name, "--latency", url + "/rerank"]
        text = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    found = {
        name: m.group(1) if (m := re.search(pattern, text, re.M)) else None
        for name, pattern in (
            ("p50", r"^\s*50%\s+([\d.]+\w*)"),
            ("p99", r"^\s*99%\s+([\d.]+\w*)"),
            ("rps", r"Requests/sec:\s+(\S+)"),
        )
    }
    return {"connections": 16, "seconds": seconds, **found, "non_2xx": "Non-2xx" in text}


# ---- the run --------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from rundir.reader import read_users
    from service.settings import Settings

    defaults = Settings.model_fields
    users = sorted(read_users(args.run))
    bodies = [json.dumps({"user_id": u, "top_n": args.top_n}).encode() for u in users]
    env = {**ENV_DEFAULTS, "DPO4REC_FUSION_WEIGHT": "0", **dict(pair.split("=", 1) for pair in args.env)}
    variants = [Variant("served", env)]
    if args.engine_off:
        variants.append(Variant("engine_off", {**env, "DPO4REC_LLM_ENABLED": "false"}))
    if args.baseline_src:
        variants.append(Variant("baseline", env, args.baseline_src.resolve()))
    for spec in args.variant:  # NAME:KEY=VALUE,KEY=VALUE
        name, _, pairs = spec.partition(":")
        variants.append(Variant(name, {**env, **dict(p.split("=", 1) for p in pairs.split(",") if p)}))
    for v in variants:
        v.server = Server(args.run.resolve(), free_port(), args.logs / f"{v.name}.server.log", env=v.env, cwd=v.src)
        v.server.start()
    try:
        for v in variants:
            assert v.server is not None and v.server.proc is not None
            async with httpx.AsyncClient(base_url=v.server.base_url, trust_env=False) as client:
                startup = await v.server.wait_ready(client, args.startup_timeout_s)
            v.nice = os.getpriority(os.PRIO_PROCESS, v.server.proc.pid)
            print(f"[service] {v.name}: ready in {startup:.0f} s, niceness {v.nice}", flush=True)
        return await sweep(args, variants, users, bodies, defaults)
    finally:
        for v in variants:
            if v.server is not None:
                v.server.stop()


async def sweep(
    args: argparse.Namespace, variants: list[Variant], users: list[str], bodies: list[bytes], defaults: Any
) -> dict[str, Any]:
    cfg = LoadConfig(url="", duration_s=args.duration, slo_ms=args.slo_ms, stop_factor=args.stop_factor, seed=args.seed)
    k = max(defaults["retrieve_k"].default, args.top_n)  # what the service retrieves for the same request
    bare = Bare(args.run, k, defaults["torch_threads"].default)
    bare_bodies = [u.encode() for u in users if u.encode() in bare.users]
    bare_nice = variants[0].nice
    bare_levels: list[dict[str, Any]] = []
    rates = args.rates or geometric_rates(args.sweep_from, args.sweep_factor, args.sweep_to)
    bare_stopped = False
    for i, rate in enumerate(rates):
        for v in variants:
            if v.stopped:
                continue
            level = await service_level(v, rate, bodies, cfg, cfg.seed + i)
            v.levels.append(level)
            v.stopped = _over(level, cfg)
            _print_level(v.name, level)
            await asyncio.sleep(cfg.pause_s)
        if not bare_stopped:
            bare.coalescer.batches = bare.coalescer.calls = 0
            with niceness(bare_nice):
                level, _ = await measure_level(bare, rate, bare_bodies, cfg, cfg.seed + i)  # type: ignore[arg-type]
            level["mean_batch"] = bare.coalescer.calls / max(1, bare.coalescer.batches)
            level["loadavg_1m"] = os.getloadavg()[0]
            bare_levels.append(level)
            bare_stopped = _over(level, cfg)
            _print_level("bare", level)
            await asyncio.sleep(cfg.pause_s)
        if bare_stopped and all(v.stopped for v in variants):
            break
    sizes = sorted({1, *(max(1, round(lv["mean_batch"])) for v in variants for lv in v.levels if lv["mean_batch"])})
    with niceness(bare_nice):
        by_batch = bare.cost_by_batch(sizes)
    wrk = {}
    if args.wrk:
        wrk = {v.name: wrk_closed_loop(v.server.base_url, users, args.top_n) for v in variants if v.server}
    return summary(args, cfg, variants, bare_levels, bare_nice, by_batch, wrk, rates)


def _over(level: dict[str, Any], cfg: LoadConfig) -> bool:
    p99 = level["p99_good_ms"]
    return cfg.stop_factor > 0 and (p99 is None or p99 > cfg.stop_factor * cfg.slo_ms)


def _print_level(name: str, level: dict[str, Any]) -> None:
    lat, server = level["latency_ms"], level.get("other_cpu_s") or {}
    batch = f"{level['mean_batch']:.2f}" if level.get("mean_batch") else "-"
    print(
        f"[{name:>10}] {level['rate']:8g}/s  p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])}  "
        f"p99 good {_ms(level['p99_good_ms'])}{' ok' if level['meets_slo'] else '   '}  "
        f"goodput {level['goodput_rps']:7.1f}/s  "
        f"server cpu {sum(server.values()):5.2f} s  generator cpu {level['generator_cpu_s']:5.2f} s  batch {batch}",
        flush=True,
    )


def _ms(value: float | None) -> str:
    return "      -" if value is None or math.isnan(value) else f"{value:7.1f}"


def headline(levels: list[dict[str, Any]]) -> float | None:
    passing = [lv["rate"] for lv in levels if lv["meets_slo"]]
    return max(passing) if passing else None


def summary(
    args: argparse.Namespace,
    cfg: LoadConfig,
    variants: list[Variant],
    bare_levels: list[dict[str, Any]],
    bare_nice: int | None,
    by_batch: dict[int, dict[str, float]],
    wrk: dict[str, Any],
    rates: list[float],
) -> dict[str, Any]:
    bare_rps = headline(bare_levels)
    services = {}
    for v in variants:
        rps = headline(v.levels)
        services[v.name] = {
            "env": {k: val for k, val in v.env.items() if k.startswith("DPO4REC_")},
            "src": str(v.src) if v.src else "this checkout",
            "niceness": v.nice,
            "headline_rps": rps,
            "ratio_to_bare": rps / bare_rps if rps and bare_rps else None,
            "max_goodput_rps": max((lv["goodput_rps"] for lv in v.levels), default=None),
            "max_ok_rps": max((brief(lv)["ok_rps"] for lv in v.levels), default=None),
            "levels": [brief(lv) for lv in v.levels],
            "wrk_c16": wrk.get(v.name),
        }
    out = {
        "command": [sys.executable, "-m", "benchmarks.retrieval_path", *sys.argv[1:]],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine() | _cpu_flags(),
        "config": {**asdict(cfg), "top_n": args.top_n, "users": args.run.name, "rates": rates},
        "services": services,
        "bare": {
            "what": "SASRec user vectors + FAISS top-k in this process, batched by service.batching.Coalescer",
            "niceness": bare_nice,
            "headline_rps": bare_rps,
            "max_goodput_rps": max((lv["goodput_rps"] for lv in bare_levels), default=None),
            "max_ok_rps": max((brief(lv)["ok_rps"] for lv in bare_levels), default=None),
            "levels": [brief(lv) for lv in bare_levels],
            "cpu_by_batch_size": by_batch,
        },
    }
    print(f"bare SASRec + FAISS: {bare_rps} req/s at p99 <= {cfg.slo_ms:g} ms")
    for name, s in services.items():
        ratio = f"{s['ratio_to_bare']:.3f}" if s["ratio_to_bare"] else "-"
        print(f"service {name}: {s['headline_rps']} req/s at p99 <= {cfg.slo_ms:g} ms, {ratio} of bare", flush=True)
    return out


def _git(*argv: str) -> str:
    return subprocess.run(["git", *argv], capture_output=True, text=True).stdout.strip()


def _cpu_flags() -> dict[str, bool]:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    return {"avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (its users are sent)")
    p.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",") if x], help="req/s per level")
    p.add_argument("--sweep-from", type=float, default=100.0, help="geometric sweep: first rate")
    p.add_argument("--sweep-factor", type=float, default=1.5)
    p.add_argument("--sweep-to", type=float, default=20000.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per level")
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--stop-factor", type=float, default=3.0, help="a sweep ends after p99 > this x SLO")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--engine-off", action="store_true", help="also a service with DPO4REC_LLM_ENABLED=false")
    p.add_argument("--baseline-src", type=Path, help="also a service run from this source tree (A/B)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for every service (e.g. DPO4REC_API_NICE=0)")
    p.add_argument(
        "--variant", action="append", default=[], help="also a service with more settings: NAME:KEY=VALUE,KEY=VALUE"
    )
    p.add_argument("--wrk", action=argparse.BooleanOptionalAction, default=True, help="closed loop at the end")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "retrieval_path", help="server logs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval_path.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per request in flight
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    result = asyncio.run(run(args))
    write_summary(args.out, result)


if __name__ == "__main__":
    main()
