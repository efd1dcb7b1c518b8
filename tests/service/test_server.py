"""``serve()`` for real: uvicorn in a child process, JSON logs with the request id, SIGTERM shuts down cleanly.

Runs without the LLM (``DPO4REC_LLM_ENABLED=false``) so the process starts in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rundir.versions import publish

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("served", ["run directory", "run root"])
def test_serve_answers_logs_json_and_stops_on_sigterm(tiny_run_dir, tmp_path, served):
    if served == "run root":  # a root whose current version is the tiny run (serve() checks what current names)
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / "v1").symlink_to(tiny_run_dir)
        publish(tmp_path / "root", "v1")
        tiny_run_dir = tmp_path / "root"
    port = _free_port()
    env = {**os.environ, "DPO4REC_LLM_ENABLED": "false", "DPO4REC_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    code = f"from service.server import serve; serve({str(tiny_run_dir)!r}, port={port})"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        response = httpx.post(
            f"{base}/rerank", json={"user_id": "u1", "top_n": 2}, headers={"X-Request-ID": "srv-test-1"}, timeout=10
        )
        assert response.status_code == 200 and response.json()["request_id"] == "srv-test-1"
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
    # uvicorn re-raises the signal it handled after a clean shutdown, so the exit status is SIGTERM's
    assert returncode in (0, -signal.SIGTERM), log_path.read_text()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("logger") == "service.access"]
    assert any(entry.get("request_id") == "srv-test-1" and entry.get("status") == 200 for entry in access)
    assert any("shutting down (in-flight drained: True)" in entry["msg"] for entry in lines)
    assert any("redis-server stopped" in entry["msg"] for entry in lines)
