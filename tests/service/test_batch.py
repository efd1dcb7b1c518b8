"""Batch jobs (dpo4rec/batch.py) on a tiny run, with the real engine and a real Redis.

- ``rerank``: a job SIGKILLed mid-way (a real process, its engine included), a torn last line added
  as a kill mid-write would leave, then resumed: every request line answered exactly once, in order,
  bad lines answered with the 4xx the service would give.
- ``preferences``: a job interrupted after its first chunk, then resumed: the refreshed users get new
  texts whose vectors are their encodings, everyone else keeps theirs, Redis holds the new ones, the
  run directory still verifies.
- Ray Data path = the local path on the same requests; a Ray the job starts runs its actors at the job's
  niceness, and the driver waits for actors here to close their engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dpo4rec import batch
from dpo4rec.batch import preferences_job, rerank_job
from rundir.manifest import verify
from tests.service.support import VERSION, build_run_dir

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"max_model_len": 1024, "max_num_seqs": 16, "json_logs": False}


def _write_requests(path: Path, n_known: int) -> list[int]:
    """Known users, a new user with history, re-rank-only, and bad lines; returns the non-blank line numbers."""
    lines = [json.dumps({"user_id": f"u{i % 30}", "top_n": 5}) for i in range(n_known)]
    lines.insert(3, json.dumps({"user_id": "new-1", "history": ["101", "102", "103"], "top_n": 3}))
    lines.insert(5, json.dumps({"user_id": "u1", "candidates": ["110", "111", "112", "113"]}))
    lines.insert(7, "{not json")
    lines.insert(9, json.dumps({"user_id": "nobody"}))  # unknown user without history: 422
    lines.insert(11, "")
    path.write_text("\n".join(lines) + "\n")
    return [n for n, line in enumerate(lines, start=1) if line]


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_answers(answers: list[dict], expected_lines: list[int], requests: Path) -> None:
    assert [a["line"] for a in answers] == expected_lines  # each once, in input order
    raw = requests.read_text().splitlines()
    for answer in answers:
        body = raw[answer["line"] - 1]
        if body.startswith("{not") or '"nobody"' in body:
            assert answer["error"]["code"] == 422, answer
        else:
            results = answer["response"]["results"]
            assert results and answer["response"]["model_version"] == VERSION
            scores = [r["relevance_score"] for r in results]
            assert scores == sorted(scores, reverse=True)
            assert answer["response"]["degraded"] == [], answer  # a batch waits for the LLM


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory, tiny_run_dir: Path) -> dict[str, Any]:
    """A rerank job SIGKILLed mid-way (a subprocess), then resumed here: the single-process answers
    that the Ray test compares with, so one engine start serves both tests."""
    tmp_path = tmp_path_factory.mktemp("rerank-job")
    requests, out = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    expected = _write_requests(requests, n_known=80)
    partial = out.with_name(out.name + ".partial")
    env = {**os.environ, **{f"DPO4REC_{k.upper()}": str(v) for k, v in SETTINGS.items()}}
    cmd = [sys.executable, "-m", "dpo4rec.cli", "rerank", str(requests), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--run", str(tiny_run_dir), "--chunk-size", "2"],
        cwd=REPO,
        env=env,
        start_new_session=True,  # its engine process is in the same group: one killpg ends both
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finished_early = out.exists()
    done_before = partial.read_bytes().count(b"\n") if partial.exists() else -1
    if partial.exists():
        with open(partial, "ab") as f:
            f.write(b'{"line": 999, "respo')  # a kill in the middle of a write
    result = rerank_job(tiny_run_dir, requests, out, chunk_size=8, settings=SETTINGS)
    return {
        "requests": requests,
        "out": out,
        "partial": partial,
        "expected": expected,
        "finished_early": finished_early,
        "stderr": err.decode()[-2000:],
        "done_before": done_before,
        "result": result,
    }


def test_rerank_job_killed_then_resumed(killed_and_resumed: dict[str, Any], tiny_run_dir: Path) -> None:
    job = killed_and_resumed
    assert not job["finished_early"], f"the job finished before it could be killed; stderr:\n{job['stderr']}"
    expected, done_before, result = job["expected"], job["done_before"], job["result"]
    assert 4 <= done_before < len(expected), done_before
    assert result.resumed_from == done_before and result.total == len(expected)
    partial = job["partial"]
    assert not partial.exists() and not partial.with_name(partial.name + ".json").exists()
    _check_answers(_answers(job["out"]), expected, job["requests"])
    # a finished job is not redone
    again = rerank_job(tiny_run_dir, job["requests"], job["out"], settings=SETTINGS)
    assert again.resumed_from == -1 and again.total == len(expected)


def test_rerank_job_refuses_a_checkpoint_of_other_inputs(tmp_path: Path, tiny_run_dir: Path) -> None:
    requests, out = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    _write_requests(requests, n_known=4)
    batch.Checkpoint(out, "0123456789abcdef").open()
    with pytest.raises(batch.RunDirError, match="other inputs"):
        rerank_job(tiny_run_dir, requests, out, settings=SETTINGS)


def test_preferences_job_interrupted_then_resumed(
    tmp_path: Path, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from rundir.preferences import load_preferences
    from service.redis_server import EmbeddedRedis

    run = build_run_dir(tmp_path / "run", tiny_llm_dir)
    before, _ = load_preferences(run)
    chosen = ["u3", "u7", "u11", "u26", "u28"]  # u26 and u28 have no preference yet
    (tmp_path / "redis").mkdir()
    server = EmbeddedRedis(tmp_path / "redis")
    asyncio.run(server.start())
    try:
        settings = {**SETTINGS, "redis_url": server.url}
        calls = {"n": 0}
        real = batch.ChunkWorker.lines

        def crash_after_first_chunk(self: batch.ChunkWorker, payloads: list[str]) -> list[str]:
            calls["n"] += 1
            if calls["n"] > 1:
                raise KeyboardInterrupt("killed")
            return real(self, payloads)

        monkeypatch.setattr(batch.ChunkWorker, "lines", crash_after_first_chunk)
        with pytest.raises(KeyboardInterrupt):
            preferences_job(run, users=chosen, chunk_size=2, settings=settings)
        monkeypatch.undo()
        checkpoint = run / (batch.PREFERENCES_CHECKPOINT + ".partial")
        assert checkpoint.read_text().count("\n") == 2

        result = preferences_job(run, users=chosen, chunk_size=2, settings=settings)

        assert (result.total, result.resumed_from) == (5, 2)
        assert not checkpoint.exists()
        verify(run, checksums=True)  # the manifest follows the rewritten files
        texts, vectors = load_preferences(run)
        assert list(texts)[: len(before)] == list(before) and len(texts) == len(before) + 2  # each user once
        for user in before:
            if user not in chosen:
                assert texts[user] == before[user]
        from retrieval.encoder import EncoderConfig, TextEncoder

        encoded = TextEncoder(EncoderConfig()).encode([texts[u] for u in chosen])
        rows = [list(texts).index(u) for u in chosen]
        np.testing.assert_allclose(vectors[rows], encoded, atol=1e-5)
        client = redis.Redis(unix_socket_path=server.url.removeprefix("unix://"))
        for user in chosen:
            cached = client.hgetall(f"pref:{VERSION}:{user}")
            assert cached and cached[b"text"].decode() == texts[user]
    finally:
        asyncio.run(server.close())


def test_ray_path_equals_local_path(tmp_path: Path, tiny_run_dir: Path, killed_and_resumed: dict[str, Any]) -> None:
    import ray  # the ray extra is part of the test install (scripts/install.sh)

    # the first 13 lines (all the special ones): Ray actors are slow to feed on this 2-core machine
    head = killed_and_resumed["requests"].read_text().splitlines(keepends=True)[:13]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(head))
    expected = [n for n in killed_and_resumed["expected"] if n <= len(head)]
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        remote = rerank_job(
            tiny_run_dir, requests, tmp_path / "ray.jsonl", chunk_size=4, use_ray=True, settings=SETTINGS
        )
    finally:
        ray.shutdown()
    a = [x for x in _answers(killed_and_resumed["out"]) if x["line"] <= len(head)]
    b = _answers(remote.output)
    _check_answers(b, expected, requests)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        if "error" in x:
            assert x["error"] == y["error"]
            continue
        xs = {r["item_id"]: r["relevance_score"] for r in x["response"]["results"]}
        ys = {r["item_id"]: r["relevance_score"] for r in y["response"]["results"]}
        assert xs.keys() == ys.keys()
        np.testing.assert_allclose([xs[k] for k in xs], [ys[k] for k in xs], atol=1e-4)


def test_local_ray_workers_run_at_the_jobs_niceness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray starts its workers at niceness 15 (below the driver, Ray's daemons and everything else here); a
    Ray the job starts runs them, and so the engines they start, at ``worker_niceness``; actors get threads."""
    import ray

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not ray.is_initialized()
    settings = batch.RaySettings(worker_niceness=0)
    try:
        assert batch.start_ray(settings)
        assert not batch.start_ray(settings)  # Ray is up: nothing to start

        @ray.remote(num_cpus=1)
        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, 0)

        assert ray.get(niceness.remote()) == 0
    finally:
        ray.shutdown()
    assert batch.actor_env(batch.RaySettings()) == {"OMP_NUM_THREADS": "2"}  # the driver's, not Ray's 1
    assert batch.actor_env(batch.RaySettings(actor_threads=3)) == {"OMP_NUM_THREADS": "3"}
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert batch.actor_env(batch.RaySettings(actor_cpus=1.5)) == {"OMP_NUM_THREADS": "2"}


def test_the_driver_waits_for_local_actors_to_close_their_engines(tmp_path: Path) -> None:
    """A mark per open engine: a live process's is waited for (up to the timeout), a dead one's dropped."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / str(dead.pid)).touch()
        (tmp_path / str(alive.pid)).touch()
        began = time.monotonic()
        batch._wait_closed(tmp_path, timeout_s=1.0)
        assert time.monotonic() - began >= 1.0  # the live one was waited for
        assert sorted(p.name for p in tmp_path.iterdir()) == [str(alive.pid)]
        (tmp_path / str(alive.pid)).unlink()  # its engine closed
        batch._wait_closed(tmp_path, timeout_s=30.0)
    finally:
        alive.kill()
        alive.wait()
