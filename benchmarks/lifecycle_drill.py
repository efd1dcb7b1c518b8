"""Lifecycle drills against a real ``dpo4rec serve``: run versions swapped under open-loop load, an engine killed, and
the Redis server stopped.

SPEC section 9 ("Lifecycle"). A copy of ``--run`` is made a run root (``rundir.versions``) in a temporary folder,
served by one service process per fusion weight, under the fixed-rate open-loop load of
``benchmarks.open_loop`` (its arrival schedule, sender, per-request records and summaries):

1. **Rollout.** A baseline window with no swap, then a swap window: three versions written by ``dpo4rec.items``
   (an item added, an often-retrieved item removed, another item added) published one after another, each
   followed by ``POST /admin/reload``, ``--gap`` s apart; then a tampered copy of the last one (a file off its
   manifest checksum, a version name of its own) published and reloaded, which must be refused; then
   ``rollback`` and a reload. The versions are written before the load: the first ``add_items`` took 18-149 s
   on these shared 2 cores (it fits the content tower), and the swap window is to measure the swap, not the
   build. Per fusion weight (0: retrieval path at ``--rate``; 1: the engine scores every answer, at
   ``--llm-rate``): 5xx and connection errors (target 0); whether every answer names a version that was
   served while it was in flight; answers that mix versions (markers below); p50/p99 of both windows
   (target: swap p99 <= 1.5 x baseline p99); reload outcomes and seconds; RSS of the API process and of its
   process tree before the swaps, at their peak during them, and after.
2. **Engine kill.** At fusion weight 1, ``--kill-at`` s into the load, SIGKILL of the vLLM EngineCore
   process(es); ``/readyz`` and ``/livez`` polled every 0.5 s throughout (target: 200 always); 5xx (target
   0); answers flagged ``llm_unavailable``; the recovery time, from the kill to the first LLM-scored answer
   to a request sent after it, with no action taken.
3. **Redis stop** (the load tests' fault drill, on the open-loop generator). The service uses a redis-server the
   drill owns (``DPO4REC_REDIS_URL``); at fusion weight 1, ``--redis-at`` s into the load it is stopped, and
   ``--redis-out`` s later started again (empty, as after a crash: the service re-warms it from the run). Per
   window (before, outage, after): 5xx and connection errors (target 0), answers flagged
   ``cache_unavailable`` (the outage's, and none after), LLM-scored share, p50/p99; the cache lookups by result
   from ``/metrics`` (errors in the outage, hits again after: recovered with no action); ``/readyz`` and
   ``/livez`` polled throughout.

Markers of a mixed answer (one computed partly by another version than the one it names): the added items
have embeddings of ~1/20 the norm of trained ones (the content tower's ridge shrinks them) and are never
retrieved, so every 4th request *gives* its candidates, among them both added items by text under titles of
its own (``CandidateItem``): a version whose catalog holds an item answers with the catalog's title, one
without it echoes the request's, so each answer says which catalog ranked it. The removed item is the one
the warm-up answers held most often: a retrieved answer that names a version without it must not hold it.

From the repository root (7-9 minutes on 2 shared cores; the service logs end up in /tmp/lifecycle-drill-service-*)::

    python -m benchmarks.lifecycle_drill --run runs/tiny --rate 20 --llm-rate 2.5 \\
        --out benchmarks/results/lifecycle_drill.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.open_loop import LoadConfig, Poster, Shot, arrival_times, read_bodies, send_level, summarize
from benchmarks.service_bench import write_summary
from benchmarks.support import ENV_DEFAULTS, Server, cpu_flags, free_port, load_now, machine

ROOT = Path(__file__).resolve().parents[1]
ADDED = ("drill-added-1", "drill-added-2")  # item ids of the two added versions
CATALOG_TITLE = {ADDED[0]: "Lifecycle Drill One", ADDED[1]: "Lifecycle Drill Two"}  # in the versions' catalogs
REQUEST_TITLE = {ADDED[0]: "request title one", ADDED[1]: "request title two"}  # in the requests that give them
POLL_S = 0.5  # /readyz, /livez and RSS
TOLERANCE_S = 0.05  # clock offsets between the sender's start and the drill's (the served-version check)


@dataclass
class DrillConfig:
    run: Path  # a run directory; copied, never changed
    rate: float = 20.0  # req/s at fusion weight 0 (retrieval path)
    llm_rate: float = 2.5  # req/s at fusion weight 1: the engine scores every answer
    weights: tuple[float, ...] = (0.0, 1.0)  # one rollout drill per weight; the kill drill on weight 1's server
    baseline_s: float = 30.0  # load with no swap, before the swaps
    gap_s: float = 8.0  # between two reloads
    drills: tuple[str, ...] = ("rollout", "kill")  # and "redis"
    api_nice: int | None = None  # DPO4REC_API_NICE of the service (None: its default, 0 since 2026-12-06)
    kill_at_s: float = 20.0  # load before the kill
    kill_after_s: float = 120.0  # load after it (an engine start took 40-65 s quiet, 54-97 s loaded)
    redis_at_s: float = 20.0  # load before the Redis stop
    redis_out_s: float = 20.0  # Redis down this long
    redis_after_s: float = 20.0  # load after it is back
    top_n: int = 20
    timeout_s: float = 10.0  # client timeout of one request
    start_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        windows = (self.baseline_s, self.gap_s, self.kill_at_s, self.kill_after_s, self.redis_at_s, self.redis_out_s)
        if min(self.rate, self.llm_rate, *windows, self.redis_after_s) <= 0:
            raise ValueError("rates, windows and the gap must be positive")
        if not set(self.drills) <= {"rollout", "kill", "redis"}:
            raise ValueError(f"drills are rollout, kill and redis, got {self.drills}")
        if {"kill", "redis"} & set(self.drills) and 1.0 not in self.weights:
            raise ValueError("the kill and redis drills run on the fusion-weight-1 server: keep 1 in --weights")

    @property
    def swap_s(self) -> float:
        return 1.0 + 4 * self.gap_s  # the steps of `plan`, and a gap after the last swap

    def plan(self, versions: Versions) -> list[tuple[float, str, str | None]]:
        """(seconds into the swap window, action, version dir) of the swap window."""
        g = self.gap_s
        return [
            (1.0, "swap", versions.dirs["added"]),
            (1.0 + g, "swap", versions.dirs["removed"]),
            (1.0 + 2 * g, "swap", versions.dirs["added_again"]),
            (1.0 + 3 * g, "broken", versions.dirs["broken"]),
            (1.0 + 3.5 * g, "rollback", None),
        ]


# ---- the versions -------------------------------------------------------------------------------------------


@dataclass
class Versions:
    dirs: dict[str, str]  # role -> version dir in the root
    names: dict[str, str]  # role -> version name (manifest; what answers name)
    removed_item: str
    build_s: dict[str, float]

    def expected(self) -> dict[str, tuple[bool, bool, bool]]:
        """Version name -> (holds ADDED[0], holds ADDED[1], removed_item taken out of retrieval)."""
        n = self.names
        return {
            n["first"]: (False, False, False),
            n["added"]: (True, False, False),
            n["removed"]: (True, False, True),
            n["added_again"]: (True, True, True),
        }


def build_versions(root: Path, removed_item: str, work: Path) -> Versions:
    """The drill's versions, written into ``root`` by ``dpo4rec.items``; ``current`` then back at the first."""
    from dpo4rec.items import add_items, remove_items
    from rundir.manifest import read_manifest
    from rundir.versions import current_version, publish

    first = current_version(root)
    files = []
    for i, item in enumerate(ADDED):
        path = work / f"{item}.jsonl"
        row = {"id": item, "title": CATALOG_TITLE[item], "genres": ["Comedy", "Drama"], "year": 1999 + i}
        path.write_text(json.dumps(row) + "\n")
        files.append(path)
    build_s: dict[str, float] = {}
    results = {}
    for role, make in (
        ("added", lambda: add_items(root, files[0])),
        ("removed", lambda: remove_items(root, [removed_item])),
        ("added_again", lambda: add_items(root, files[1])),
    ):
        begin = time.perf_counter()
        results[role] = make()
        build_s[role] = round(time.perf_counter() - begin, 1)
        print(f"[versions] {role}: {results[role].version} in {build_s[role]} s", flush=True)
    broken = tamper(root, results["added_again"].version)
    publish(root, first)
    dirs = {"first": first, **{role: r.version for role, r in results.items()}, "broken": broken}
    names = {role: str(read_manifest(root / d)["version"]) for role, d in dirs.items()}
    return Versions(dirs, names, removed_item, build_s)


def tamper(root: Path, version: str) -> str:
    """A copy of ``version`` under a name of its own whose first listed file no longer matches its manifest
    checksum (the catalog: still readable, so only the checksum can refuse it)."""
    from rundir.manifest import MANIFEST, atomic_write_text, read_manifest

    name = f"{version}+tampered"
    shutil.copytree(root / version, root / name)
    manifest = read_manifest(root / name)
    manifest["version"] = name  # were it served, its answers would say so
    atomic_write_text(root / name / MANIFEST, json.dumps(manifest, indent=2))
    with open(root / name / sorted(manifest["files"])[0], "a") as f:
        f.write("\n")
    return name


# ---- the service, its processes and its answers ----------------------------------------------------------------


async def start_service(
    root: Path, log: Path, weight: float, cfg: DrillConfig, redis_url: str | None = None
) -> tuple[Server, float]:
    """``dpo4rec serve --run ROOT`` at ``weight``; reloads only on ``POST /admin/reload`` (the drill times them)."""
    import httpx

    env = {**ENV_DEFAULTS, "DPO4REC_FUSION_WEIGHT": f"{weight:g}", "DPO4REC_RELOAD_POLL_S": "null"}
    if redis_url is not None:
        env["DPO4REC_REDIS_URL"] = redis_url
    if cfg.api_nice is not None:
        env["DPO4REC_API_NICE"] = str(cfg.api_nice)
    server = Server(root, free_port(), log, env)
    server.start()
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        return server, await server.wait_ready(client, cfg.start_timeout_s)


def tree(pid: int) -> list[Any]:
    import psutil

    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def rss_mib(pid: int) -> tuple[float, float]:
    """RSS of the API process ``pid``, and of it with its descendants (engine core, embedded Redis), MiB; shared
    pages count once per process."""
    import psutil

    sizes = []
    for proc in tree(pid):
        with suppress(psutil.Error):
            sizes.append(proc.memory_info().rss / 2**20)
    return round(sizes[0] if sizes else 0.0, 1), round(sum(sizes), 1)


def engine_cores(pid: int) -> list[tuple[int, str]]:
    """(pid, name) of the vLLM engine-core processes below ``pid`` (``VLLM::EngineCore``; the kernel cuts the
    name to ``VLLM::EngineCor``)."""
    import psutil

    found = []
    for proc in tree(pid)[1:]:
        with suppress(psutil.Error):
            name = proc.name()
            if "EngineCor" in name or "EngineCor" in " ".join(proc.cmdline()[:1]):
                found.append((proc.pid, name))
    return found


async def probe(client: Any, path: str) -> tuple[int, dict[str, Any], float]:
    """Status (-1: no answer within 5 s), body and seconds of one GET."""
    begin = time.perf_counter()
    try:
        r = await client.get(path, timeout=5.0)
        return r.status_code, r.json(), time.perf_counter() - begin
    except Exception as e:  # noqa: BLE001  # a probe that fails is the measurement (status -1)
        return -1, {"error": type(e).__name__}, time.perf_counter() - begin


async def monitor(client: Any, pid: int, t0: float, stop: asyncio.Event, samples: list[dict[str, Any]]) -> None:
    """Every POLL_S: /readyz (status, engine check), /livez (status), the tree's RSS."""
    while not stop.is_set():
        t = time.perf_counter() - t0
        (ready, body, ready_s), (live, _, _) = await asyncio.gather(probe(client, "/readyz"), probe(client, "/livez"))
        checks = body.get("checks") or {}
        failing = sorted(name for name, check in checks.items() if not check.get("ok"))
        api, whole = rss_mib(pid)
        samples.append(
            {"t": round(t, 2), "readyz": ready, "readyz_s": round(ready_s, 2), "failing": failing, "livez": live,
             "engine": (checks.get("engine") or {}).get("detail", ""), "api": api, "tree": whole}
        )  # fmt: skip
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, t0 + t + POLL_S - time.perf_counter()))


@dataclass
class Evidence:
    version: str | None
    catalog_holds: tuple[bool | None, ...]  # per added item in the answer: its title was the catalog's
    removed_seen: bool | None  # a retrieved answer: holds the removed item (None: an answer to given candidates)


class MarkedPoster(Poster):
    """``open_loop.Poster`` that also reads each 2xx answer's markers (``Evidence``)."""

    def __init__(self, cfg: LoadConfig, removed_item: str):
        super().__init__(cfg)
        self.removed_item = removed_item
        self.evidence: list[Evidence] = []

    async def post(self, body: bytes) -> tuple[int, bytes]:
        status, content = await super().post(body)
        if 200 <= status < 300:
            with suppress(ValueError, KeyError, TypeError, AttributeError):
                self.evidence.append(read_evidence(json.loads(content), self.removed_item))
        return status, content


def read_evidence(answer: dict[str, Any], removed_item: str) -> Evidence:
    results = {r["item_id"]: r for r in answer["results"]}
    titles = {item: (results[item].get("item") or {}).get("title") for item in ADDED if item in results}
    holds = tuple(None if item not in titles else titles[item] != REQUEST_TITLE[item] for item in ADDED)
    removed = None if titles else removed_item in results
    return Evidence(answer.get("model_version"), holds, removed)


def make_bodies(root: Path, cfg: DrillConfig, removed_item: str | None) -> list[dict[str, Any]]:
    """One retrieval request per user (shuffled), and after every third a request giving its candidates."""
    from rundir.reader import read_catalog

    args = argparse.Namespace(user=[], users_from=root, seed=cfg.seed, top_n=cfg.top_n)
    retrieved = read_bodies(args)
    if removed_item is None:
        return retrieved
    catalog = read_catalog(root)
    known = [catalog[i].item_id for i in range(1, 12) if catalog[i].item_id != removed_item][:8]
    bodies: list[dict[str, Any]] = []
    for i, body in enumerate(retrieved):
        bodies.append(body)
        if i % 3 == 2:
            added = [{"id": item, "title": REQUEST_TITLE[item], "categories": ["Comedy"]} for item in ADDED]
            given = {"user_id": body["user_id"], "candidates": [*added, *known], "top_n": 10, "return_items": True}
            bodies.append(given)
    return bodies


async def warm_up(base_url: str, bodies: Sequence[dict[str, Any]]) -> Counter[str]:
    """Each body once, 4 at a time (caches and the engine's prefix cache warm); items of the answers, counted."""
    import httpx

    seen: Counter[str] = Counter()
    gate = asyncio.Semaphore(4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as client:

        async def one(body: dict[str, Any]) -> None:
            async with gate:
                r = await client.post("/rerank", json=body)
                if r.status_code == 200:
                    seen.update(result["item_id"] for result in r.json()["results"])

        await asyncio.gather(*(one(b) for b in bodies))
    return seen


# ---- the rollout drill ------------------------------------------------------------------------------------------


@dataclass
class Served:
    version: str
    since: float  # drill seconds: the reload that swapped it in began
    until: float = math.inf  # the reload that swapped it out ended


async def run_steps(
    admin: Any, root: Path, plan: list[tuple[float, str, str | None]], t0: float, timeline: list[Served]
) -> list[dict[str, Any]]:
    from rundir.versions import publish, rollback

    steps = []
    for at, action, version in plan:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        begin = time.perf_counter() - t0
        if action == "rollback":
            version = rollback(root)
        else:
            assert version is not None
            publish(root, version)
        r = await admin.post("/admin/reload", timeout=120.0)
        end = time.perf_counter() - t0
        body = r.json() if r.status_code == 200 else {}
        if body.get("outcome") == "swapped":
            timeline[-1].until = end
            timeline.append(Served(body["version"], begin))
        steps.append(
            {"t_s": round(begin, 2), "action": action, "published": version, "status": r.status_code,
             "outcome": body.get("outcome"), "serving": body.get("version"), "server_s": body.get("seconds"),
             "wall_s": round(end - begin, 3), "detail": str(body.get("detail", ""))[:160]}
        )  # fmt: skip
        print(f"[rollout] {begin:6.1f} s {action} {version}: {body.get('outcome')} ({end - begin:.2f} s)", flush=True)
    return steps


def window(shots: list[Shot], lo: float, hi: float, rate: float, cfg: LoadConfig) -> dict[str, Any]:
    """``open_loop.summarize`` of the requests scheduled in [lo, hi), reduced to what the drills report."""
    end = hi if hi < cfg.duration_s else math.inf  # the last arrival falls on the load's end (arrival_times)
    part = [s for s in shots if lo <= s.scheduled_s < end]
    if not part:
        return {"sent": 0}
    span = max(hi - lo, 1e-3)
    lv = summarize(rate, part, replace(cfg, duration_s=span), span)
    statuses = Counter(s.status for s in part)
    return {
        "from_s": round(lo, 1), "to_s": round(hi, 1), "sent": lv["sent"],
        "p50_ms": lv["latency_ms"]["p50"], "p99_ms": lv["latency_ms"]["p99"], "max_ms": lv["latency_ms"]["max"],
        "http_5xx": sum(n for status, n in statuses.items() if status >= 500),
        "connection_errors": statuses.get(-1, 0), "statuses": lv["statuses"], "degraded": lv["degraded"],
        "llm_scored_share": lv["llm_scored_share"], "send_lag_p99_ms": lv["send_lag_ms"]["p99"],
        "model_versions": lv["model_versions"],
        "errors": lv["errors_seen"],
    }  # fmt: skip


def segments(shots: list[Shot], bounds: list[float], rate: float, cfg: LoadConfig) -> list[dict[str, Any]]:
    """Latency from one reload to the next: its first 2 s (a new version's caches are cold) and the rest."""
    out = []
    for lo, hi in itertools.pairwise(bounds):
        first, rest = window(shots, lo, min(hi, lo + 2.0), rate, cfg), window(shots, lo + 2.0, hi, rate, cfg)
        row: dict[str, Any] = {"from_s": round(lo, 1), "to_s": round(hi, 1)}
        for name, w in (("first_2s", first), ("rest", rest)):
            row[name] = {k: w.get(k) for k in ("sent", "p50_ms", "p99_ms")}
        out.append(row)
    return out


def served_check(shots: list[Shot], timeline: list[Served]) -> dict[str, Any]:
    """Each answer names a version that was served at some moment between its send and its answer."""
    unknown: Counter[str] = Counter()
    outside = checked = 0
    for s in shots:
        if not s.ok or s.model_version is None or s.latency_ms is None:
            continue
        checked += 1
        send, answered = s.scheduled_s + s.lag_ms / 1000, s.scheduled_s + s.latency_ms / 1000
        spans = [e for e in timeline if e.version == s.model_version]
        if not spans:
            unknown[s.model_version] += 1
        elif not any(e.since - TOLERANCE_S <= answered and send <= e.until + TOLERANCE_S for e in spans):
            outside += 1
    return {"answers": checked, "never_served": dict(unknown), "outside_served_span": outside}


def mix_check(evidence: list[Evidence], versions: Versions) -> dict[str, Any]:
    """Answers whose markers contradict the version they name; and how many answers each marker checked."""
    expected = versions.expected()
    mixed: Counter[str] = Counter()
    given: Counter[str] = Counter()
    removed_absent_checks: Counter[str] = Counter()
    removed_seen: Counter[str] = Counter()
    for ev in evidence:
        want = expected.get(ev.version or "")
        if want is None:
            continue  # served_check counts it
        if ev.removed_seen is None:
            given[ev.version or ""] += 1
            if any(h is not None and h != w for h, w in zip(ev.catalog_holds, want[:2], strict=True)):
                mixed[ev.version or ""] += 1
        elif want[2]:
            removed_absent_checks[ev.version or ""] += 1
            mixed[ev.version or ""] += ev.removed_seen
        else:
            removed_seen[ev.version or ""] += ev.removed_seen
    return {
        "mixed": sum(mixed.values()),
        "mixed_by_version": dict(mixed),
        "given_candidate_answers": dict(given),  # the added items' titles checked
        "retrieved_answers_checked_for_removed": dict(removed_absent_checks),
        "removed_item_seen_where_allowed": dict(removed_seen),  # the marker is visible at all
    }


async def rollout_drill(
    server: Server, root: Path, cfg: DrillConfig, weight: float, rate: float, versions: Versions, bodies: list
) -> dict[str, Any]:
    import httpx

    assert server.proc is not None
    total = cfg.baseline_s + cfg.swap_s
    lcfg = LoadConfig(url=server.base_url, duration_s=total, timeout_s=cfg.timeout_s, seed=cfg.seed)
    poster = MarkedPoster(lcfg, versions.removed_item)
    encoded = [json.dumps(b).encode() for b in bodies]
    offsets = arrival_times(rate, total, lcfg.burstiness, cfg.seed)
    timeline = [Served(versions.names["first"], -math.inf)]
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    plan = [(cfg.baseline_s + at, action, v) for at, action, v in cfg.plan(versions)]
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as admin:
            t0 = time.perf_counter()
            load = asyncio.create_task(send_level(poster, encoded, offsets, lcfg.drain_cap_s))
            watch = asyncio.create_task(monitor(admin, server.proc.pid, t0, stop, samples))
            steps = await run_steps(admin, root, plan, t0, timeline)
            shots, peak_in_flight = await load
            await asyncio.sleep(1.0)  # the last drain closes the replaced version
            stop.set()
            await watch
    finally:
        await poster.aclose()
    before = [x for x in samples if x["t"] < cfg.baseline_s]
    during = [x for x in samples if x["t"] >= cfg.baseline_s]
    rss = {
        part: {
            "before": before[-1][part] if before else None,
            "peak_swaps": max((x[part] for x in during), default=None),
            "after": samples[-1][part] if samples else None,
        }
        for part in ("api", "tree")
    }
    base, swaps = window(shots, 0, cfg.baseline_s, rate, lcfg), window(shots, cfg.baseline_s, total, rate, lcfg)
    ratio = swaps["p99_ms"] / base["p99_ms"] if base.get("p99_ms") else None
    return {
        "fusion_weight": weight,
        "rate": rate,
        "baseline": base,
        "swaps": swaps,
        "p99_ratio": ratio,
        "http_5xx": base["http_5xx"] + swaps["http_5xx"],
        "connection_errors": base["connection_errors"] + swaps["connection_errors"],
        "served_versions": served_check(shots, timeline),
        "mixing": mix_check(poster.evidence, versions),
        "reloads": steps,
        "between_reloads": segments(shots, [cfg.baseline_s, *(x["t_s"] for x in steps), total], rate, lcfg),
        "rss_mib": rss,
        "probes": probes(samples),
        "peak_in_flight": peak_in_flight,
    }


# ---- the engine-kill drill --------------------------------------------------------------------------------------


def probes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """/readyz and /livez: status counts, the slowest /readyz, and each /readyz that was not a 200."""
    return {
        "count": len(samples),
        "readyz": dict(Counter(str(x["readyz"]) for x in samples)),
        "livez": dict(Counter(str(x["livez"]) for x in samples)),
        "readyz_max_s": max((x["readyz_s"] for x in samples), default=None),
        "readyz_not_200": [[x["t"], x["readyz"], x["readyz_s"], x["failing"]] for x in samples if x["readyz"] != 200],
    }


def engine_timeline(samples: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(t, engine check) at each change of its first word (alive, restarting, failed)."""
    out: list[tuple[float, str]] = []
    for x in samples:
        if not out or x["engine"].split(" ")[:1] != out[-1][1].split(" ")[:1]:
            out.append((x["t"], x["engine"][:120]))
    return out


async def kill_drill(server: Server, cfg: DrillConfig, bodies: list) -> dict[str, Any]:
    import httpx

    assert server.proc is not None
    pid = server.proc.pid
    total = cfg.kill_at_s + cfg.kill_after_s
    lcfg = LoadConfig(url=server.base_url, duration_s=total, timeout_s=cfg.timeout_s, seed=cfg.seed + 1)
    poster = Poster(lcfg)
    encoded = [json.dumps(b).encode() for b in bodies]
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            t0 = time.perf_counter()
            offsets = arrival_times(cfg.llm_rate, total, lcfg.burstiness, cfg.seed + 1)
            load = asyncio.create_task(send_level(poster, encoded, offsets, lcfg.drain_cap_s))
            watch = asyncio.create_task(monitor(client, pid, t0, stop, samples))
            await asyncio.sleep(max(0.0, t0 + cfg.kill_at_s - time.perf_counter()))
            killed = engine_cores(pid)
            if not killed:
                raise RuntimeError(f"no EngineCore process below the service (pid {pid}): nothing to kill")
            for core, _ in killed:
                os.kill(core, signal.SIGKILL)
            t_kill = time.perf_counter() - t0
            print(f"[kill] {t_kill:.1f} s: SIGKILL {killed}", flush=True)
            shots, _ = await load
            stop.set()
            await watch
    finally:
        await poster.aclose()
    after = [s for s in shots if s.ok and s.latency_ms is not None and s.scheduled_s >= t_kill and s.prompt_tokens]
    first = min(after, key=lambda s: s.scheduled_s + (s.latency_ms or 0.0) / 1000, default=None)
    recovered = None if first is None else first.scheduled_s + (first.latency_ms or 0.0) / 1000
    unavailable = [s for s in shots if "llm_unavailable" in s.degraded]
    end_outage = recovered if recovered is not None else total
    return {
        "rate": cfg.llm_rate,
        "killed": [{"pid": p, "name": n} for p, n in killed],
        "kill_t_s": round(t_kill, 2),
        "recovery_s": None if recovered is None else round(recovered - t_kill, 2),
        "llm_unavailable_answers": len(unavailable),
        "llm_unavailable_span_s": [round(min(s.scheduled_s for s in unavailable), 1),
                                   round(max(s.scheduled_s for s in unavailable), 1)] if unavailable else None,
        "before_kill": window(shots, 0, t_kill, cfg.llm_rate, lcfg),
        "outage": window(shots, t_kill, end_outage, cfg.llm_rate, lcfg),
        "after_recovery": window(shots, end_outage, total, cfg.llm_rate, lcfg),
        "http_5xx": sum(1 for s in shots if s.status >= 500),
        "connection_errors": sum(1 for s in shots if s.status == -1),
        "probes": probes(samples),
        "engine_checks": engine_timeline(samples),
        "engine_cores_after": [{"pid": p, "name": n} for p, n in engine_cores(pid)],
    }  # fmt: skip


async def cache_lookups(client: Any) -> dict[str, float]:
    """``dpo4rec_preference_cache_lookups_total`` by result (hit, miss, error) from ``/metrics``."""
    r = await client.get("/metrics", timeout=10.0)
    out = {"hit": 0.0, "miss": 0.0, "error": 0.0}
    for line in r.text.splitlines():
        if line.startswith("dpo4rec_preference_cache_lookups_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = out.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def redis_drill(server: Server, redis: Any, cfg: DrillConfig, bodies: list) -> dict[str, Any]:
    import httpx

    assert server.proc is not None
    total = cfg.redis_at_s + cfg.redis_out_s + cfg.redis_after_s
    lcfg = LoadConfig(url=server.base_url, duration_s=total, timeout_s=cfg.timeout_s, seed=cfg.seed + 2)
    poster = Poster(lcfg)
    encoded = [json.dumps(b).encode() for b in bodies]
    samples: list[dict[str, Any]] = []
    lookups: dict[str, dict[str, float]] = {}
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            t0 = time.perf_counter()
            offsets = arrival_times(cfg.llm_rate, total, lcfg.burstiness, cfg.seed + 2)
            load = asyncio.create_task(send_level(poster, encoded, offsets, lcfg.drain_cap_s))
            watch = asyncio.create_task(monitor(client, server.proc.pid, t0, stop, samples))
            lookups["start"] = await cache_lookups(client)
            await asyncio.sleep(max(0.0, t0 + cfg.redis_at_s - time.perf_counter()))
            lookups["stop"] = await cache_lookups(client)
            await redis.stop()
            t_stop = time.perf_counter() - t0
            print(f"[redis] {t_stop:.1f} s: redis-server stopped", flush=True)
            await asyncio.sleep(max(0.0, t0 + cfg.redis_at_s + cfg.redis_out_s - time.perf_counter()))
            lookups["restart"] = await cache_lookups(client)
            await redis.start()
            t_start = time.perf_counter() - t0
            print(f"[redis] {t_start:.1f} s: redis-server started again (empty)", flush=True)
            shots, _ = await load
            lookups["end"] = await cache_lookups(client)
            stop.set()
            await watch
    finally:
        await poster.aclose()

    def delta(a: str, b: str) -> dict[str, float]:
        return {k: lookups[b].get(k, 0.0) - lookups[a].get(k, 0.0) for k in lookups[b]}

    flagged = [s for s in shots if "cache_unavailable" in s.degraded]
    return {
        "rate": cfg.llm_rate,
        "stopped_s": round(t_stop, 2),
        "started_s": round(t_start, 2),
        "before": window(shots, 0, t_stop, cfg.llm_rate, lcfg),
        "outage": window(shots, t_stop, t_start, cfg.llm_rate, lcfg),
        "after": window(shots, t_start, total, cfg.llm_rate, lcfg),
        "cache_lookups": {"before": delta("start", "stop"), "outage": delta("stop", "restart"),
                          "after": delta("restart", "end")},
        "cache_unavailable_answers": len(flagged),
        "cache_unavailable_after_restart": sum(1 for s in flagged if s.scheduled_s >= t_start + 1.0),
        "http_5xx": sum(1 for s in shots if s.status >= 500),
        "connection_errors": sum(1 for s in shots if s.status == -1),
        "probes": probes(samples),
    }  # fmt: skip


# ---- the whole run ----------------------------------------------------------------------------------------------


async def drill(cfg: DrillConfig, work: Path) -> dict[str, Any]:
    from rundir.versions import init_root, publish

    root = work / "root"
    copy = work / cfg.run.resolve().name
    shutil.copytree(cfg.run, copy)
    init_root(root, copy)
    versions: Versions | None = None
    out: dict[str, Any] = {
        "rollout": [], "engine_kill": None, "redis_stop": None, "service_start_s": {}, "loadavg": []
    }  # fmt: skip
    weights = cfg.weights if "rollout" in cfg.drills else (1.0,)
    redis = None
    if "redis" in cfg.drills:  # a redis-server the drill can stop (the embedded one is the service's child)
        from service.redis_server import EmbeddedRedis

        (work / "redis").mkdir()
        redis = EmbeddedRedis(work / "redis")
        await redis.start()
    for weight in weights:
        if versions is not None:
            publish(root, versions.dirs["first"])
        url = redis.url if redis is not None and redis.running else None
        server, ready_s = await start_service(root, work / f"service-w{weight:g}.log", weight, cfg, url)
        out["service_start_s"][f"{weight:g}"] = round(ready_s, 1)
        try:
            if "rollout" in cfg.drills:
                versions = versions or await make_versions(server, root, cfg, work)
                bodies = make_bodies(root, cfg, versions.removed_item)
                await warm_up(server.base_url, bodies)
                rate = cfg.rate if weight == 0 else cfg.llm_rate
                out["loadavg"].append(load_now(f"rollout drill, fusion weight {weight:g}"))
                out["rollout"].append(await rollout_drill(server, root, cfg, weight, rate, versions, bodies))
            if "kill" in cfg.drills and weight == 1.0:
                bodies = make_bodies(root, cfg, None)
                if "rollout" not in cfg.drills:
                    await warm_up(server.base_url, bodies)
                out["loadavg"].append(load_now("engine-kill drill"))
                out["engine_kill"] = await kill_drill(server, cfg, bodies)
            if redis is not None and weight == 1.0:
                bodies = make_bodies(root, cfg, None)
                if not {"rollout", "kill"} & set(cfg.drills):
                    await warm_up(server.base_url, bodies)
                out["loadavg"].append(load_now("redis-stop drill"))
                out["redis_stop"] = await redis_drill(server, redis, cfg, bodies)
        finally:
            server.stop()
    if redis is not None:
        await redis.stop()
    if versions is not None:
        out["versions"] = {"names": versions.names, "removed_item": versions.removed_item, "build_s": versions.build_s}
    return out


async def make_versions(server: Server, root: Path, cfg: DrillConfig, work: Path) -> Versions:
    """Warm the first server up; the item its answers hold most often is the one the second version removes."""
    seen = await warm_up(server.base_url, make_bodies(root, cfg, None))
    removed = seen.most_common(1)[0][0]
    print(f"[versions] building (removed item {removed}: in {seen[removed]} warm-up answers)", flush=True)
    return await asyncio.to_thread(build_versions, root, removed, work)


def targets(result: dict[str, Any]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    for r in result["rollout"]:
        w = f"w{r['fusion_weight']:g}"
        met[f"{w}_no_5xx_no_connection_errors"] = r["http_5xx"] == 0 and r["connection_errors"] == 0
        sv = r["served_versions"]
        met[f"{w}_every_version_served"] = not sv["never_served"] and sv["outside_served_span"] == 0
        met[f"{w}_no_mixed_answers"] = r["mixing"]["mixed"] == 0
        met[f"{w}_broken_refused"] = any(s["action"] == "broken" and s["outcome"] == "refused" for s in r["reloads"])
        met[f"{w}_swap_p99_within_1.5x"] = r["p99_ratio"] is not None and r["p99_ratio"] <= 1.5
    k = result.get("engine_kill")
    if k:
        met["kill_readyz_always_200"] = set(k["probes"]["readyz"]) == {"200"}
        met["kill_no_5xx_no_connection_errors"] = k["http_5xx"] == 0 and k["connection_errors"] == 0
        met["kill_llm_answers_resumed"] = k["recovery_s"] is not None
    r = result.get("redis_stop")
    if r:
        met["redis_no_5xx_no_connection_errors"] = r["http_5xx"] == 0 and r["connection_errors"] == 0
        met["redis_outage_flagged"] = r["outage"].get("degraded", {}).get("cache_unavailable", 0) > 0
        hits_after = r["cache_lookups"]["after"].get("hit", 0)
        met["redis_recovered"] = hits_after > 0 and not r["cache_unavailable_after_restart"]
        met["redis_livez_always_200"] = set(r["probes"]["livez"]) == {"200"}  # /readyz: 503 unless redis_optional
    return met


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    table = Table(title="rollout under open-loop load: baseline window vs swap window")
    for name in ("weight", "req/s", "base p50", "base p99", "swap p50", "swap p99", "ratio", "5xx", "conn err"):
        table.add_column(name, justify="right")
    for name in ("not served", "mixed", "reloads (outcome s)", "API RSS MiB before/peak/after"):
        table.add_column(name, justify="right")
    for r in result["rollout"]:
        b, s, m = r["baseline"], r["swaps"], r["rss_mib"]["api"]
        reloads = " ".join(f"{x['outcome']} {x['server_s'] or 0:.2f}" for x in r["reloads"])
        sv = r["served_versions"]
        table.add_row(
            f"{r['fusion_weight']:g}", f"{r['rate']:g}", ms(b["p50_ms"]), ms(b["p99_ms"]), ms(s["p50_ms"]),
            ms(s["p99_ms"]), "-" if r["p99_ratio"] is None else f"{r['p99_ratio']:.2f}", str(r["http_5xx"]),
            str(r["connection_errors"]), str(sum(sv["never_served"].values()) + sv["outside_served_span"]),
            str(r["mixing"]["mixed"]), reloads, f"{m['before']}/{m['peak_swaps']}/{m['after']}",
        )  # fmt: skip
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if result["rollout"]:
        console.print(table)
    k = result.get("engine_kill")
    if k:
        console.print(
            f"engine kill at {k['kill_t_s']} s ({len(k['killed'])} process): recovery {k['recovery_s']} s, "
            f"llm_unavailable answers {k['llm_unavailable_answers']}, 5xx {k['http_5xx']}, "
            f"connection errors {k['connection_errors']}, /readyz {k['probes']['readyz']} (slowest "
            f"{k['probes']['readyz_max_s']} s), /livez {k['probes']['livez']}"
        )
    r = result.get("redis_stop")
    if r:
        console.print(
            f"redis stopped {r['stopped_s']}-{r['started_s']} s: cache_unavailable answers "
            f"{r['cache_unavailable_answers']} ({r['cache_unavailable_after_restart']} after the restart), lookups "
            f"{r['cache_lookups']}, 5xx {r['http_5xx']}, connection errors {r['connection_errors']}, p99 before/"
            f"outage/after {ms(r['before'].get('p99_ms'))}/{ms(r['outage'].get('p99_ms'))}/"
            f"{ms(r['after'].get('p99_ms'))} ms, /readyz {r['probes']['readyz']}"
        )
    met = result["targets"].items()
    console.print("targets: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met))


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() or "?"
    except OSError:
        return "?"


def parse_args(argv: Sequence[str] | None) -> tuple[DrillConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="run directory to copy (never changed)")
    p.add_argument("--rate", type=float, default=20.0, help="req/s at fusion weight 0")
    p.add_argument("--llm-rate", type=float, default=2.5, help="req/s at fusion weight 1 (rollout and kill)")
    p.add_argument("--weights", default="0,1", help="fusion weights of the rollout drill, comma-separated")
    p.add_argument("--baseline", type=float, default=30.0, help="seconds of load before the first swap")
    p.add_argument("--gap", type=float, default=8.0, help="seconds between reloads")
    p.add_argument("--drills", default="rollout,kill", help="which drills: rollout, kill, redis (comma-separated)")
    p.add_argument("--api-nice", type=int, help="DPO4REC_API_NICE of the service (default: the service's)")
    p.add_argument("--kill-at", type=float, default=20.0, help="seconds of load before the kill")
    p.add_argument("--kill-after", type=float, default=120.0, help="seconds of load after the kill")
    p.add_argument("--redis-at", type=float, default=20.0, help="seconds of load before Redis is stopped")
    p.add_argument("--redis-out", type=float, default=20.0, help="seconds Redis stays down")
    p.add_argument("--redis-after", type=float, default=20.0, help="seconds of load after it is back")
    p.add_argument("--top-n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary run root and the service logs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lifecycle_drill.json")
    args = p.parse_args(argv)
    cfg = DrillConfig(
        run=args.run, rate=args.rate, llm_rate=args.llm_rate, weights=tuple(float(w) for w in args.weights.split(",")),
        baseline_s=args.baseline, gap_s=args.gap, drills=tuple(args.drills.split(",")),
        api_nice=args.api_nice, kill_at_s=args.kill_at, kill_after_s=args.kill_after, redis_at_s=args.redis_at,
        redis_out_s=args.redis_out, redis_after_s=args.redis_after, top_n=args.top_n, seed=args.seed,
    )  # fmt: skip
    return cfg, args


def main(argv: Sequence[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lifecycle-drill-"))
    print(f"[drill] working in {work}", flush=True)
    began, wall = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    start = load_now("start")
    try:
        result = asyncio.run(drill(cfg, work))
    finally:
        if not args.keep:
            for log in work.glob("service-*.log"):  # the reloads' and restarts' lines outlive the root
                shutil.copy(log, Path(tempfile.gettempdir()) / f"lifecycle-drill-{log.name}")
            shutil.rmtree(work, ignore_errors=True)
            print(f"[drill] service logs: {tempfile.gettempdir()}/lifecycle-drill-service-w*.log", flush=True)
    loads = [start, *result.pop("loadavg"), load_now("end")]
    result["targets"] = targets(result)
    report = {
        "command": [sys.executable, "-m", "benchmarks.lifecycle_drill", *(argv or sys.argv[1:])],
        "date": began,
        "commit": commit(),
        "wall_s": round(time.perf_counter() - wall, 1),
        "config": {**asdict(cfg), "run": str(cfg.run)},
        "machine": {**machine(), "flags": cpu_flags()},
        "loadavg": [{"when": x["when"], "loadavg": [round(v, 2) for v in x["loadavg"]]} for x in loads],
        **result,
    }
    print_tables(result)
    write_summary(args.out, report)


if __name__ == "__main__":
    main()
