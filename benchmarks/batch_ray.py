"""The batch jobs on Ray Data next to the local path: the same inputs, the same chunk size, in one run.

Issue 25, item 4 ("Batch on Ray at local speed"). For each job (``preferences``: every input generates a
preference text with the LLM; ``rerank``: ``/rerank`` bodies of the run's users at fusion weight
``--fusion-weight``, so the LLM scores them) it runs the chunk stream of ``dpo4rec.batch`` twice on the same
payloads: the local path (``_local_stream``: one service stack in this process) and the Ray path
(``_ray_stream``: ``map_batches`` over ``--actors`` engine-owning actors, on a local Ray started as the job
starts it, ``dpo4rec.batch.start_ray``: every core of this machine). Each finished chunk's arrival time
is recorded at the driver, so:

- start-up seconds: until the first chunk arrived, less one steady chunk (Ray start, actor start, engine
  start and warm-up, run loading), with Ray's own ``ray.init`` also given apart;
- steady lines/s: the lines of chunks 2..n-1 over the time from the first chunk's arrival to chunk n-1's;
- lines/s per core: steady lines/s over the cores both paths have (this machine's; Ray is started with all
  of them), and the Ray/local ratio of steady throughput (the issue's aim: >= 0.9).

The CPU seconds of every process below this one (by name: the Ray worker, ``VLLM::EngineCor``, raylet, ...)
are recorded per path. The run directory is copied to a temporary folder first (the engines are the same;
nothing is written to the run). From the repository root::

    python -m benchmarks.batch_ray --run runs/tiny --inputs 64 --chunk-size 16 \\
        --out benchmarks/results/batch_ray.json

Every input generates one preference with the LLM: ``preferences`` users, and ``rerank`` requests of new users
with a history (so every request pays the same); past the run's users, histories are rotated under new ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import CPU_FLAGS, ENV_DEFAULTS, cpu_between, cpu_flags, load_now, machine, tree_cpu


def flag_table() -> dict[str, bool]:
    """Which of the engine-relevant CPU flags this machine has, each named (``benchmarks.support.cpu_flags``)."""
    present = cpu_flags()
    return {flag: flag in present for flag in CPU_FLAGS if flag != "avx2"}


def payloads(kind: str, run: Path, n: int) -> list[str]:
    """``n`` inputs of the job, alike in cost: each generates one preference text with the LLM (``rerank``: a
    new user with a history, then re-ranked with the LLM). Past the run's users, histories are rotated so
    no prompt repeats (the prefix cache would make those cheaper)."""
    from dpo4rec.batch import _histories

    histories = _histories(run, None)
    users = list(histories)
    rows = []
    for i in range(n):
        user = users[i % len(users)]
        turn = i // len(users)
        history = histories[user][turn:] + histories[user][:turn]
        if kind == "preferences":
            rows.append(json.dumps({"user_id": f"{user}-{turn}", "history": history}))
        else:
            request = json.dumps({"user_id": f"bench-{i}", "history": history, "top_n": 10})
            rows.append(json.dumps({"line": i + 1, "request": request}))
    return rows


def summarise(marks: list[tuple[float, int]], end_s: float) -> dict[str, Any]:
    """Start-up and steady rate from the chunks' arrival times (seconds from the stream's start)."""
    first_s, first_n = marks[0]
    # chunks 2..n-1: robust to a driver that sees each chunk one late (then the last two come together)
    later = marks[1:-1]
    steady = sum(n for _, n in later) / (later[-1][0] - first_s) if later else None
    chunk_s = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    return {
        "lines": sum(n for _, n in marks),
        "chunks": len(marks),
        "first_chunk_s": round(first_s, 2),
        "startup_s": round(first_s - first_n / steady, 2) if steady else None,
        "steady_lines_per_s": round(steady, 3) if steady else None,
        "chunk_s_median": round(statistics.median(chunk_s), 2) if chunk_s else None,
        "total_s": round(end_s, 2),
        "arrivals_s": [round(t, 2) for t, _ in marks],
    }


def one_path(kind: str, spec: Any, items: list[str], chunk: int, use_ray: bool, actors: int) -> dict[str, Any]:
    from dpo4rec import batch

    load_before = load_now(f"{kind} {'ray' if use_ray else 'local'} start")
    cpu_before = tree_cpu(os.getpid())
    t0 = time.perf_counter()
    ray_init_s = None
    if use_ray:  # started as the job starts it (dpo4rec.batch.start_ray), timed on its own
        if hasattr(batch, "start_ray"):
            batch.start_ray()
        else:  # a source tree from before start_ray (a baseline): what its _ray_stream did
            import ray

            ray.init(include_dashboard=False, log_to_driver=False)
        ray_init_s = round(time.perf_counter() - t0, 2)
    marks: list[tuple[float, int]] = []
    cpu_after = cpu_before
    stream = batch._ray_stream if use_ray else batch._local_stream
    try:
        for lines in stream(spec, items, chunk, actors):
            marks.append((time.perf_counter() - t0, len(lines)))
            cpu_after = tree_cpu(os.getpid())  # the engines' processes are gone once the stream closes
            print(f"[{kind} {'ray' if use_ray else 'local'}] {marks[-1][0]:7.1f} s: +{len(lines)} lines", flush=True)
    finally:
        if use_ray:
            import ray

            ray.shutdown()
    out = {"path": "ray" if use_ray else "local", **summarise(marks, time.perf_counter() - t0)}
    out["ray_init_s"] = ray_init_s
    out["cpu_s"] = {k: v for k, v in cpu_between(cpu_before, cpu_after).items() if v >= 0.5}
    out["load"] = [load_before["loadavg"], load_now(f"{kind} {out['path']} end")["loadavg"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/tiny"), help="run directory (copied, not written)")
    parser.add_argument("--jobs", default="preferences,rerank", help="jobs to measure, comma-separated")
    parser.add_argument("--inputs", type=int, default=64, help="inputs per job (the same on both paths)")
    parser.add_argument("--chunk-size", type=int, default=16, help="lines per chunk (both paths)")
    parser.add_argument("--actors", type=int, default=1, help="Ray Data actors (each owns an engine)")
    parser.add_argument("--order", default="local,ray", help="path order per job (local,ray or ray,local)")
    parser.add_argument("--fusion-weight", type=float, default=0.5, help="rerank job: LLM weight (>0: LLM on)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_ray.json"), help="JSON")
    args = parser.parse_args()
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from dpo4rec.batch import JobSpec, service_settings

    cores = os.cpu_count() or 1
    jobs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="batch-ray-") as tmp:
        run = Path(tmp) / args.run.name
        shutil.copytree(args.run, run)
        for kind in [k.strip() for k in args.jobs.split(",") if k.strip()]:
            overrides: dict[str, Any] = {"fusion_weight": args.fusion_weight} if kind == "rerank" else {}
            spec = JobSpec(kind, str(run), service_settings(run, **overrides))
            items = payloads(kind, run, args.inputs)
            paths = {}
            for path in args.order.split(","):
                paths[path] = one_path(kind, spec, items, args.chunk_size, path == "ray", args.actors)
            local, ray_ = paths["local"], paths["ray"]
            for p in (local, ray_):
                rate = p["steady_lines_per_s"]
                p["steady_lines_per_s_per_core"] = round(rate / cores, 3) if rate else None
            ratio = (
                round(ray_["steady_lines_per_s"] / local["steady_lines_per_s"], 3)
                if ray_["steady_lines_per_s"] and local["steady_lines_per_s"]
                else None
            )
            jobs[kind] = {"inputs": len(items), "ray_over_local_steady": ratio, **paths}
            print(
                f"{kind}: local {local['steady_lines_per_s']} lines/s (start-up {local['startup_s']} s), "
                f"ray {ray_['steady_lines_per_s']} lines/s (start-up {ray_['startup_s']} s, ray.init "
                f"{ray_['ray_init_s']} s): ray/local {ratio}",
                flush=True,
            )
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.batch_ray "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {**machine(), "cpu_flags": flag_table()},
        "cores": cores,
        "chunk_size": args.chunk_size,
        "actors": args.actors,
        "jobs": jobs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"summary: {args.out}")


if __name__ == "__main__":
    main()
