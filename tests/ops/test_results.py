"""Benchmark results in the repository are summaries that are read, not per-request logs (issue 26).

``benchmarks/results/`` and ``loadtests/results/`` hold the JSON summaries (and figures) that docs/BENCHMARKS.md
cites; every request's row goes to a path outside the repository (``--requests-log``) or nowhere. Checks the
files that git would hold, and what ``benchmarks/service_bench.py`` writes. No benchmark runs here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks.service_bench import Sample, parse_args, split_rows, to_jsonable

ROOT = Path(__file__).resolve().parents[2]
RESULT_DIRS = ("benchmarks/results", "loadtests/results")
MAX_BYTES = 300_000  # the largest summary is ~35 KB; a run's per-request rows were ~1 MB
PER_REQUEST_KEYS = {"samples", "payloads", "per_request", "per_request_ms", "shots"}
ROW_FIELDS = {"user_id", "status", "latency_ms"}  # what one request's row names


def result_files() -> list[Path]:
    """The files git holds or would add (tracked, or untracked and not ignored) under the results folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *RESULT_DIRS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the ignored logs
        return [
            p for d in RESULT_DIRS for p in (ROOT / d).iterdir() if p.is_file() and p.suffix not in {".log", ".csv"}
        ]
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def per_request_arrays(value: Any, where: str = "") -> list[str]:
    """Where ``value`` holds per-request rows: a key named for them, or a list of 20+ rows of requests."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in PER_REQUEST_KEYS:
                found.append(f"{where}.{key}")
            found += per_request_arrays(item, f"{where}.{key}")
    elif isinstance(value, list):
        rows = [v for v in value if isinstance(v, dict) and ROW_FIELDS & v.keys()]
        if len(rows) >= 20:
            found.append(f"{where}[{len(rows)} rows]")
        for i, item in enumerate(value[:20]):
            found += per_request_arrays(item, f"{where}[{i}]")
    return found


def test_result_files_are_small_summaries() -> None:
    files = result_files()
    assert any(p.name == "service_goodput_aba9.json" for p in files), "the results folders were not found"
    big = {str(p.relative_to(ROOT)): p.stat().st_size for p in files if p.stat().st_size > MAX_BYTES}
    assert not big, f"over {MAX_BYTES} bytes (per-request rows go outside the repository): {big}"
    rows = {
        str(p.relative_to(ROOT)): found
        for p in files
        if p.suffix == ".json" and (found := per_request_arrays(json.loads(p.read_text())))
    }
    assert not rows, f"per-request arrays in a summary: {rows}"


def sample(user: str, ms: float, status: int = 200) -> Sample:
    return Sample(user, status, ms, 0.0, {"total": ms - 1}, [], 370, "cache", history=["1", "2"])


def test_service_bench_writes_a_summary_and_the_rows_apart() -> None:
    answers = [sample(str(i), 300.0 + i) for i in range(30)]
    report: dict[str, Any] = {
        "service": {
            "levels": [{"concurrency": 1, "ok": 30, "latency_ms": {"n": 30, "p50": 314.5}}],
            "samples": {"warmup": answers[:2], "c1": answers},
            "payloads": {"c1": [{"user_id": s.user_id, "history": s.history} for s in answers]},
            "cache": {"miss": {"latency_ms": {"n": 2}}, "hit": {"latency_ms": {"n": 2}}},
        },
        "service_repeat": {"levels": [], "samples": {"c1": answers[:25]}, "payloads": {}},
        "bare_engine": {"single": {"latency_ms": {"n": 30}, "per_request_ms": [290.0] * 30}, "concurrent": []},
        "overhead": {
            "median_ratio": 1.03,
            "per_request": [{"user_id": s.user_id, "service_ms": s.latency_ms, "bare_ms": 290.0} for s in answers],
        },
    }
    rows = split_rows(report)
    summary = json.loads(json.dumps(to_jsonable(report)))
    assert per_request_arrays(summary) == []
    assert summary["service"]["samples_answered"] == {"warmup": 2, "c1": 30}
    assert summary["service_repeat"]["samples_answered"] == {"c1": 25}
    assert summary["overhead"] == {"median_ratio": 1.03} and summary["service"]["levels"][0]["latency_ms"]["p50"]
    assert len(rows) == 2 + 30 + 25 + 30 + 30
    assert {(r["phase"], r["level"]) for r in rows} == {
        ("service", "warmup"),
        ("service", "c1"),
        ("service_repeat", "c1"),
        ("bare_engine", "single"),
        ("overhead", "c1"),
    }
    json.dumps(rows)  # JSONL-ready


def test_service_bench_keeps_the_requests_log_out_of_the_repository(tmp_path: Path) -> None:
    inside = ROOT / "benchmarks" / "results" / "requests.jsonl"
    with pytest.raises(SystemExit):
        parse_args(["--run", "runs/small", "--requests-log", str(inside)])
    outside = tmp_path / "requests.jsonl"
    assert parse_args(["--run", "runs/small", "--requests-log", str(outside)]).requests_log == outside
    assert parse_args(["--run", "runs/small"]).requests_log is None
