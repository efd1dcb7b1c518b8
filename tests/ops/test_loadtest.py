"""Plumbing of the load tests: ``python -m loadtests.run`` on a tiny run, with the Redis fault drill.

The real runner as a subprocess: its own redis-server, the service (``dpo4rec serve``, LLM disabled so
no vLLM engine starts) on 127.0.0.1, locust headless with the four scenarios, Redis stopped at 1/3 and
restarted at 2/3. Only counts are asserted (requests happened, no 5xx, 4xx for bad requests, cache
hits after the restart), never rates or latencies: the machine may be busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.service.support import build_run_dir

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("known_user", "new_user", "rerank_only", "bad_request")


def test_load_test_runner_with_redis_fault_drill(tmp_path: Path, tiny_llm_dir: Path) -> None:
    run = build_run_dir(tmp_path / "run", tiny_llm_dir)
    out = tmp_path / "results" / "load.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DPO4REC_")}
    env |= {
        "DPO4REC_LLM_ENABLED": "false",  # no vLLM engine: retriever order, flagged llm_disabled
        "DPO4REC_REDIS_RETRY_AFTER_S": "0.2",  # the cache breaker retries Redis soon after the restart
        "DPO4REC_JSON_LOGS": "false",
    }
    command = [
        sys.executable,
        "-m",
        "loadtests.run",
        "--run",
        str(run),
        "--duration",
        "9",
        "--users",
        "4",
        "--max-requests",
        "100000",  # the duration ends this run, not the cap
        "--fault-drill",
        "--out",
        str(out),
        "--startup-timeout-s",
        "300",
        "--grace-s",
        "60",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    report = json.loads(out.read_text())

    assert report["service"]["stopped_cleanly"], report["service"]  # SIGTERM, not SIGKILL
    assert "in-flight drained: True" in Path(report["service"]["log"]).read_text()  # the lifespan's drain ran
    assert report["locust"]["stopped_by"] == "duration"
    assert report["status_5xx"] == 0
    assert report["connection_errors"] == 0
    for name in SCENARIOS:
        assert report["scenarios"][name]["requests"] > 0, name
        assert report["scenarios"][name]["status_5xx"] == 0, name
    assert report["total"]["requests"] == sum(report["scenarios"][name]["requests"] for name in SCENARIOS)

    bad = report["scenarios"]["bad_request"]
    assert bad["failures"] == 0
    assert bad["status"] and all(400 <= int(code) < 500 for code in bad["status"]), bad["status"]
    for name in ("known_user", "new_user", "rerank_only"):
        assert set(report["scenarios"][name]["status"]) == {"200"}, report["scenarios"][name]["status"]
    assert report["degraded"]["llm_disabled"] > 0
    assert report["degraded"]["cache_unavailable"] > 0  # the outage was seen, and answered

    drill = report["fault_drill"]
    assert drill["completed"]
    phases = drill["phases"]
    assert set(phases) == {"before", "outage", "after"}
    assert not drill["any_5xx"]
    assert all(p["status_5xx"] == 0 for p in phases.values())
    assert phases["before"]["cache"]["hit"] > 0
    assert phases["before"]["cache"]["error"] == 0
    assert phases["outage"]["cache"]["error"] > 0
    assert phases["outage"]["degraded"].get("cache_unavailable", 0) > 0
    assert phases["after"]["cache"]["hit"] > 0
    assert drill["recovered"] is True
    assert report["machine"]["cores"] and report["load"] and report["command"].startswith("python")
