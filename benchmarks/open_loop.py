"""Open-loop load generator for the service's ``POST /rerank``: arrivals at a set rate, independent of answers.

SPEC section 9 ("Load is measured open-loop"). The references are ``vllm bench serve --request-rate R
--burstiness B`` (``vllm/benchmarks/serve.py``, ``get_request``: gamma inter-arrival times of shape
``burstiness`` and mean ``1/rate``, precomputed and rescaled so the requests span the intended time) and
MLPerf Inference's server scenario (Poisson arrivals; the result is the highest rate whose p99 latency
meets the bound). A closed loop (N clients, each sending when answered) slows down with the server and,
on shared cores, measures its own clients; here request ``i`` leaves at ``start + offset_i`` whatever
happened to the earlier ones, each request its own task over one shared keep-alive HTTP client: aiohttp
when installed (it cost ~0.25 ms of CPU per request here, httpx 0.7-2.7 ms, and httpx's pool fell seconds
behind at 500 req/s on 2 shared cores), else httpx.

Latency is measured from the *scheduled* send time, not the actual one, so a late generator or a full
connection pool shows up as latency instead of hiding it (coordinated omission); the generator's own
lateness (send lag) and CPU seconds are reported next to it, so a level where the generator could not
keep up can be told apart from one where the service could not. Per level: offered and achieved rates,
latency percentiles of every HTTP answer, goodput (2xx answers inside the SLO per second), the shares
of errors (non-2xx but 429, and no answer), 429s and shed answers (``llm_shed``). The headline is the
highest rate whose ``p99_good_ms`` meets the SLO, where a request without a good answer counts as
infinitely late (MLPerf's server scenario wants every query answered): a service that answers fast
with 429s or errors does not pass.

From the repository root, against a running service::

    python -m benchmarks.open_loop --url http://127.0.0.1:8000 --users-from runs/default \\
        --rates 50,100,200 --duration 20 --slo-ms 50 --out results.json

``--sweep-from 25`` (with ``--sweep-factor``, ``--sweep-to``) runs a geometric sweep instead of
``--rates``; every sweep stops after the first level whose p99 is over ``--stop-factor`` x SLO. With
``--llm`` only LLM-scored answers (``prompt_tokens`` not null) count as good. ``--server-pid PID`` adds
the CPU seconds of that process tree per level (``benchmarks.support.tree_cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.service_bench import percentile, to_jsonable, write_summary
from benchmarks.support import cpu_between, cpu_ticks, machine, steal_between, tree_cpu

ROOT = Path(__file__).resolve().parents[1]
API_KEY_ENV = "DPO4REC_LOADTEST_API_KEY"  # the same variable as the locust scenarios
INF = float("inf")
CpuHook = Callable[[], dict[str, float]]  # CPU seconds so far, by process name (e.g. ``tree_cpu(pid)``)


@dataclass
class LoadConfig:
    """One open-loop run: where to send, how long each level lasts, and what counts as a good answer."""

    url: str  # base URL of the service, e.g. http://127.0.0.1:8000
    path: str = "/rerank"
    duration_s: float = 20.0  # arrivals of one level span this long
    slo_ms: float = 50.0  # latency bound of a good answer, from the scheduled send time
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 Poisson, <1 burstier, inf constant
    llm: bool = False  # a good answer must also be LLM-scored (prompt_tokens not null)
    timeout_s: float = 10.0  # client timeout of one request (httpx: per phase; aiohttp: total)
    drain_s: float | None = None  # after the last send, wait this long for answers (None: timeout_s + 1)
    stop_factor: float = 3.0  # stop a sweep after the first level whose p99 > this x SLO (0: never)
    pause_s: float = 1.0  # between levels, so a level's queue does not spill into the next
    api_key: str | None = None  # sent as Authorization: Bearer
    max_connections: int = 4096  # high enough that the pool never queues a request at the tested rates
    client: str = "auto"  # "aiohttp" (~5x less CPU per request than httpx, measured), "httpx"; auto: aiohttp if any
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.slo_ms <= 0 or self.timeout_s <= 0:
            raise ValueError("duration_s, slo_ms and timeout_s must be positive")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be > 0 (1: Poisson, <1: burstier), got {self.burstiness}")
        if self.client not in ("auto", "httpx", "aiohttp"):
            raise ValueError(f"client is 'auto', 'httpx' or 'aiohttp', got {self.client!r}")
        if self.client == "auto":
            self.client = "aiohttp" if importlib.util.find_spec("aiohttp") else "httpx"

    @property
    def drain_cap_s(self) -> float:
        return self.timeout_s + 1.0 if self.drain_s is None else self.drain_s


# ---- the schedule ---------------------------------------------------------------------------------------


def arrival_times(
    rate: float, duration_s: float, burstiness: float = 1.0, seed: int = 0, normalize: bool = True
) -> list[float]:
    """Send offsets (seconds from the level's start) of ``round(rate * duration_s)`` requests.

    Inter-arrival times are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean ``1/rate`` whatever
    the burstiness, coefficient of variation ``1/sqrt(burstiness)`` (1 is Poisson). With ``normalize``
    the offsets are rescaled so the last one falls at ``duration_s``, as vLLM's ``get_request`` does: the
    offered rate is then exactly ``rate``."""
    if rate <= 0 or duration_s <= 0 or burstiness <= 0:
        raise ValueError(f"rate, duration_s and burstiness must be positive: {rate}, {duration_s}, {burstiness}")
    n = max(1, round(rate * duration_s))
    rng = random.Random(seed)
    if math.isinf(burstiness):
        gaps = [1.0 / rate] * n
    else:
        gaps = [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]
    offsets = list(itertools.accumulate(gaps))
    if not normalize or offsets[-1] <= 0:
        return offsets
    scale = duration_s / offsets[-1]
    return [offset * scale for offset in offsets]


def geometric_rates(start: float, factor: float, stop: float) -> list[float]:
    """``start, start*factor, ...`` up to ``stop`` (a sweep meant to pass capacity; the stop rule ends it)."""
    if start <= 0 or factor <= 1 or stop < start:
        raise ValueError("a geometric sweep needs start > 0, factor > 1 and stop >= start")
    rates = [start]
    while rates[-1] * factor <= stop * (1 + 1e-9):
        rates.append(round(rates[-1] * factor, 3))
    return rates


# ---- the sender -----------------------------------------------------------------------------------------


@dataclass
class Shot:
    """One request: when it was due, how late it left, and what came back."""

    scheduled_s: float  # offset from the level's start
    lag_ms: float = math.nan  # actual send - scheduled send: the generator's own lateness
    latency_ms: float | None = None  # answer - SCHEDULED send (None: no answer)
    status: int = -1  # HTTP status; -1: no answer (connection error, timeout, drain cap)
    error: str | None = None
    degraded: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None  # not None: the LLM scored this answer
    model_version: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def read(self, content: bytes) -> None:
        try:
            body = json.loads(content)
        except ValueError:
            self.error = "2xx with a body that is not JSON"
            return
        if isinstance(body, dict):
            self.degraded = list(body.get("degraded") or [])
            self.prompt_tokens = body.get("prompt_tokens")
            self.model_version = body.get("model_version")


class Poster:
    """One shared keep-alive HTTP client that posts pre-encoded JSON bodies (httpx or aiohttp)."""

    def __init__(self, cfg: LoadConfig):
        headers = {"content-type": "application/json"}
        if cfg.api_key:
            headers["authorization"] = f"Bearer {cfg.api_key}"
        self.url = cfg.url.rstrip("/") + cfg.path
        self.errors: tuple[type[BaseException], ...]
        if cfg.client == "aiohttp":
            try:
                import aiohttp
            except ImportError as e:
                raise SystemExit("--client aiohttp needs aiohttp: pip install aiohttp") from e
            connector = aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=cfg.max_connections)
            timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
            self.session: Any = aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)
            self.errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
        else:
            import httpx

            limits = httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections)
            self.session = httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(cfg.timeout_s))
            self.errors = (httpx.HTTPError, OSError)
        self.aiohttp = cfg.client == "aiohttp"

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.aiohttp:
            async with self.session.post(self.url, data=body) as r:
                return int(r.status), await r.read()
        r = await self.session.post(self.url, content=body)
        return int(r.status_code), r.content

    async def aclose(self) -> None:
        if self.aiohttp:
            await self.session.close()
        else:
            await self.session.aclose()


async def send_level(
    poster: Poster, bodies: Sequence[bytes], offsets: Sequence[float], drain_s: float
) -> tuple[list[Shot], int]:
    """Fire request ``i`` at ``start + offsets[i]`` (body ``i mod len(bodies)``), never waiting on answers
    to schedule; then wait up to ``drain_s`` for the answers still in flight and give up on the rest.
    Returns the shots in send order and the most requests that were in flight at once."""
    shots = [Shot(scheduled_s=offset) for offset in offsets]
    in_flight = [0, 0]  # now, peak

    async def shoot(i: int, start: float) -> None:
        shot = shots[i]
        shot.lag_ms = (time.perf_counter() - start - shot.scheduled_s) * 1000
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            status, content = await poster.post(bodies[i % len(bodies)])
        except poster.errors as e:
            shot.error = f"{type(e).__name__}: {e}"[:200]
            return
        finally:
            in_flight[0] -= 1
        shot.latency_ms = (time.perf_counter() - start - shot.scheduled_s) * 1000
        shot.status = status
        if shot.ok:
            shot.read(content)

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    for i, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(shoot(i, start)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for shot in shots:
            if shot.status == -1 and shot.error is None:
                shot.error = f"no answer within the drain cap ({drain_s:g} s after the last send)"
    return shots, in_flight[1]


# ---- one level, and a sweep -----------------------------------------------------------------------------


def tail(values: list[float], q: float) -> float:
    """``percentile`` where a miss is ``inf``: infinite as soon as the q-th value reaches a miss."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    if ordered[math.ceil(pos)] == INF:
        return INF
    return percentile(ordered, q)


def good(shot: Shot, llm: bool) -> bool:
    """A 2xx answer, LLM-scored too in ``llm`` mode (its latency is judged apart)."""
    return shot.ok and shot.error is None and (not llm or shot.prompt_tokens is not None)


def summarize(rate: float, shots: list[Shot], cfg: LoadConfig, span_s: float) -> dict[str, Any]:
    """The level's numbers: rates, latency from the scheduled time, goodput, error/429/shed shares, lag."""
    n = len(shots)
    answered = [s for s in shots if s.latency_ms is not None]
    latency = [s.latency_ms for s in answered if s.latency_ms is not None]
    in_slo = [s for s in answered if s.ok and s.error is None and (s.latency_ms or 0.0) <= cfg.slo_ms]
    # p99 for the headline: a request without a good answer counts as infinitely late (MLPerf: all must succeed)
    judged = [s.latency_ms if good(s, cfg.llm) and s.latency_ms is not None else INF for s in shots]
    p99_good = tail(judged, 99)
    lags = [s.lag_ms for s in shots if not math.isnan(s.lag_ms)]
    errors = sum(1 for s in shots if s.status == -1 or (not s.ok and s.status != 429) or s.error is not None)
    return {
        "rate": rate,
        "sent": n,
        "offered_rps": n / cfg.duration_s,
        "achieved_rps": len(answered) / span_s,  # any HTTP answer, over the level including its drain
        "latency_ms": {name: percentile(latency, q) for name, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"p999": percentile(latency, 99.9), "max": max(latency, default=math.nan)},
        "p99_good_ms": None if p99_good == INF else p99_good,  # None: over 1% without a good answer
        "meets_slo": p99_good <= cfg.slo_ms,
        "goodput_rps": sum(1 for s in in_slo if not cfg.llm or s.prompt_tokens is not None) / cfg.duration_s,
        "llm_goodput_rps": sum(1 for s in in_slo if s.prompt_tokens is not None) / cfg.duration_s,
        "error_share": errors / n,
        "connection_error_share": sum(1 for s in shots if s.status == -1) / n,
        "http_429_share": sum(1 for s in shots if s.status == 429) / n,
        "shed_share": sum(1 for s in shots if "llm_shed" in s.degraded) / n,
        "llm_scored_share": sum(1 for s in shots if s.ok and s.prompt_tokens is not None) / n,
        "degraded": dict(Counter(reason for s in shots for reason in s.degraded)),
        "statuses": {str(k): v for k, v in sorted(Counter(s.status for s in shots).items())},
        "model_versions": dict(Counter(s.model_version for s in shots if s.model_version)),
        "errors_seen": dict(Counter((s.error or "").split(":")[0] for s in shots if s.error).most_common(5)),
        "send_lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99), "max": max(lags, default=0.0)},
        "span_s": span_s,
    }


async def measure_level(
    poster: Poster, rate: float, bodies: Sequence[bytes], cfg: LoadConfig, seed: int, cpu_hook: CpuHook | None = None
) -> tuple[dict[str, Any], list[Shot]]:
    """One level at ``rate``: send, drain, summarize, with the CPU of this process (and ``cpu_hook``'s)."""
    offsets = arrival_times(rate, cfg.duration_s, cfg.burstiness, seed)
    others_before = cpu_hook() if cpu_hook else {}
    ticks_before, cpu_before, wall_before = cpu_ticks(), time.process_time(), time.perf_counter()
    shots, peak_in_flight = await send_level(poster, bodies, offsets, cfg.drain_cap_s)
    span_s = time.perf_counter() - wall_before
    cpu_s = time.process_time() - cpu_before
    level = summarize(rate, shots, cfg, span_s)
    level["peak_in_flight"] = peak_in_flight
    level["generator_cpu_s"] = cpu_s
    level["generator_cpu_ms_per_request"] = 1000 * cpu_s / max(1, len(shots))
    level["steal_share"] = steal_between(ticks_before, cpu_ticks())
    if cpu_hook:
        level["other_cpu_s"] = cpu_between(others_before, cpu_hook())
    return level, shots


@dataclass
class Sweep:
    levels: list[dict[str, Any]]
    headline_rps: float | None  # the highest rate whose p99 met the SLO (None: no level did)
    shots: list[list[Shot]]  # per level, in send order


async def sweep(
    cfg: LoadConfig,
    rates: Sequence[float],
    bodies: Sequence[dict[str, Any]],
    cpu_hook: CpuHook | None = None,
    on_level: Callable[[dict[str, Any]], None] | None = None,
) -> Sweep:
    """Levels at ``rates`` in order; stops after the first whose p99 (misses as inf) > stop_factor x SLO."""
    if not bodies:
        raise ValueError("no request bodies")
    encoded = [json.dumps(body).encode() for body in bodies]  # encoded once: the send path stays cheap
    poster = Poster(cfg)
    levels: list[dict[str, Any]] = []
    shots: list[list[Shot]] = []
    try:
        for i, rate in enumerate(rates):
            level, level_shots = await measure_level(poster, rate, encoded, cfg, cfg.seed + i, cpu_hook)
            levels.append(level)
            shots.append(level_shots)
            if on_level:
                on_level(level)
            p99 = level["p99_good_ms"]
            if cfg.stop_factor > 0 and (p99 is None or p99 > cfg.stop_factor * cfg.slo_ms):
                break
            await asyncio.sleep(cfg.pause_s)
    finally:
        await poster.aclose()
    passing = [level["rate"] for level in levels if level["meets_slo"]]
    return Sweep(levels, max(passing) if passing else None, shots)


# ---- the command line -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def print_table(cfg: LoadConfig, result: Sweep) -> None:
    from rich.console import Console
    from rich.table import Table

    mode = "LLM-scored" if cfg.llm else "2xx"
    table = Table(title=f"open loop, {cfg.duration_s:g} s/level, SLO {cfg.slo_ms:g} ms, good = {mode}")
    for name in ("rate", "offered", "achieved", "p50", "p90", "p99", "p99.9", "p99 good", "goodput"):
        table.add_column(name, justify="right")
    for name in ("err %", "429 %", "shed %", "lag p99", "gen ms/req", "gen cores"):
        table.add_column(name, justify="right")
    for lv in result.levels:
        lat = lv["latency_ms"]
        table.add_row(
            f"{lv['rate']:g}",
            f"{lv['offered_rps']:.1f}",
            f"{lv['achieved_rps']:.1f}",
            *(_ms(lat[k]) for k in ("p50", "p90", "p99", "p999")),
            _ms(lv["p99_good_ms"]) + (" ok" if lv["meets_slo"] else ""),
            f"{lv['goodput_rps']:.1f}",
            *(f"{100 * lv[k]:.1f}" for k in ("error_share", "http_429_share", "shed_share")),
            _ms(lv["send_lag_ms"]["p99"]),
            f"{lv['generator_cpu_ms_per_request']:.2f}",
            f"{lv['generator_cpu_s'] / lv['span_s']:.2f}",
        )
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: rich would wrap the 15 columns at 80 characters
        console = Console(width=160)
    console.print(table)
    console.print(f"headline: {result.headline_rps} req/s (the highest rate whose p99 met {cfg.slo_ms:g} ms)")


def read_bodies(args: argparse.Namespace) -> list[dict[str, Any]]:
    users: list[str] = [u for arg in args.user for u in arg.split(",") if u]
    if args.users_from is not None:
        from rundir.reader import read_users  # what the locust scenarios and service_bench read

        users += sorted(read_users(args.users_from))
    if not users:
        raise SystemExit("no users: give --users-from RUN_DIR or --user ID")
    random.Random(args.seed).shuffle(users)
    return [{"user_id": user, "top_n": args.top_n} for user in users]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the running service")
    p.add_argument("--path", default="/rerank")
    p.add_argument("--users-from", type=Path, help="run directory: every user of its users.json, cycled")
    p.add_argument("--user", action="append", default=[], help="user id(s), comma-separated or repeated")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--rates", type=lambda t: [float(x) for x in t.split(",") if x], help="req/s per level")
    p.add_argument("--sweep-from", type=float, help="geometric sweep instead of --rates: first rate")
    p.add_argument("--sweep-factor", type=float, default=1.5)
    p.add_argument("--sweep-to", type=float, default=5000.0, help="highest rate of the sweep")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per level")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--llm", action="store_true", help="good answers must be LLM-scored (prompt_tokens set)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="client timeout of one request")
    p.add_argument("--drain-s", type=float, help="wait for answers after the last send (default timeout + 1)")
    p.add_argument("--stop-factor", type=float, default=3.0, help="stop after p99 > this x SLO (0: never)")
    p.add_argument("--pause-s", type=float, default=1.0, help="pause between levels")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"Bearer key (default ${API_KEY_ENV})")
    p.add_argument("--client", choices=("auto", "aiohttp", "httpx"), default="auto", help="auto: aiohttp if installed")
    p.add_argument("--max-connections", type=int, default=4096)
    p.add_argument("--server-pid", type=int, help="also report the CPU of this process tree per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON summary (no per-request rows)")
    p.add_argument("--requests-log", type=Path, help="per-request rows as JSONL (a path outside the repository)")
    args = p.parse_args(argv)
    if (args.rates is None) == (args.sweep_from is None):
        p.error("give either --rates or --sweep-from")
    if args.requests_log and args.requests_log.resolve().is_relative_to(ROOT):
        p.error(f"--requests-log: per-request rows stay out of the repository ({ROOT}); pick a path outside it")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = LoadConfig(
        url=args.url, path=args.path, duration_s=args.duration, slo_ms=args.slo_ms, burstiness=args.burstiness,
        llm=args.llm, timeout_s=args.timeout_s, drain_s=args.drain_s, stop_factor=args.stop_factor,
        pause_s=args.pause_s, api_key=args.api_key, max_connections=args.max_connections, client=args.client,
        seed=args.seed,
    )  # fmt: skip
    rates = args.rates or geometric_rates(args.sweep_from, args.sweep_factor, args.sweep_to)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per request in flight
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, cfg.max_connections + 256)), hard))
    hook = (lambda: tree_cpu(args.server_pid)) if args.server_pid else None

    def progress(level: dict[str, Any]) -> None:
        print(
            f"[level] {level['rate']:g} req/s: sent {level['sent']}, p99 {_ms(level['latency_ms']['p99'])} ms, "
            f"goodput {level['goodput_rps']:.1f}/s, lag p99 {_ms(level['send_lag_ms']['p99'])} ms",
            flush=True,
        )

    bodies = read_bodies(args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = asyncio.run(sweep(cfg, rates, bodies, hook, progress))
    print_table(cfg, result)
    if args.requests_log:
        args.requests_log.parent.mkdir(parents=True, exist_ok=True)
        with open(args.requests_log, "w") as f:
            for level, shots in zip(result.levels, result.shots, strict=True):
                for shot in shots:
                    f.write(json.dumps(to_jsonable({"rate": level["rate"], **asdict(shot)})) + "\n")
    if args.out:
        report = {
            "command": [sys.executable, "-m", "benchmarks.open_loop", *(argv or sys.argv[1:])],
            "date": started,
            "config": {**asdict(cfg), "api_key": bool(cfg.api_key)},
            "rates": rates,
            "users": len(bodies),
            "headline_rps": result.headline_rps,
            "levels": result.levels,
            "machine": machine(),
        }
        write_summary(args.out, report)


if __name__ == "__main__":
    main()
