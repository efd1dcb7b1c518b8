"""The engine heals (SPEC section 9, ``service.supervisor``): its engine-core process killed with SIGKILL under a
running app, the retriever answers (flagged ``llm_unavailable``, never a 5xx), ``/readyz`` stays 200 and says the
engine is restarting, and LLM-scored answers come back on their own; background generations are not lost. With
restarts that keep failing, ``/livez`` turns 503 so that Kubernetes restarts the pod. A service shut down while
a restart waits stops its supervisor: nothing is restarted, no engine process is left.

Destructive, so on apps of their own (a module-scoped app with the LLM, its own engine and Redis, and one app
for the shutdown), never the session's ``client``. The restart is real (a new vLLM engine); making it fail is
real too (its configuration pointed at a model folder that does not exist).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.supervisor import RestartPolicy, SupervisedEngine
from tests.service.support import base_settings, metric

HISTORY = ["101", "104", "109", "115", "122"]
GENERATIONS = "dpo4rec_preference_generations_total"
DROPPED = "dpo4rec_preference_generations_dropped_total"
RECOVERY_LIMIT_S = 600  # the engine start takes 20-50 s on 2 busy cores; a bound, not a timing assertion


@pytest.fixture(scope="module")
def healing_app(tiny_run_dir: Path) -> FastAPI:
    from service.main import create_app

    return create_app(
        base_settings(
            tiny_run_dir,
            engine_restart_backoff_s=0.2,
            engine_restart_backoff_max_s=1.0,  # a death 1 s or more after a start is a fresh crash
            engine_restart_max_failures=2,
        )
    )


@pytest.fixture(scope="module")
def healing(healing_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(healing_app) as c:
        yield c


def _engine_core(app: FastAPI) -> psutil.Process:
    """The app's engine-core process: among this process's children, one its engine's start added."""
    (slot,) = app.state.service.supervisor.engines  # the tiny run: both jobs on one engine
    cores = [p for p in psutil.Process().children(recursive=True) if p.pid in slot.pids and "EngineCore" in p.name()]
    assert len(cores) == 1, f"engine processes {[(p.pid, p.name()) for p in cores]} of pids {slot.pids}"
    return cores[0]


def _past_the_crash_loop_window(app: FastAPI) -> None:
    """Wait until the engine has run longer than the back-off cap: its death is then a fresh crash, not a failed
    restart (an engine that dies sooner after its start counts as one)."""
    supervisor = app.state.service.supervisor
    (slot,) = supervisor.engines
    time.sleep(max(0.0, slot.started_at + supervisor.policy.backoff_max_s + 0.1 - time.monotonic()))


def _wait(condition: Callable[[], Any], timeout_s: float, every_s: float = 0.2) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    return None


def _rerank(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/rerank", json={"top_n": 3, "deadline_ms": 20_000, **body})
    assert response.status_code == 200, response.text  # never a 5xx
    answer: dict[str, Any] = response.json()
    return answer


def _engine_check(client: TestClient) -> str:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text  # the pod answers correctly all along
    check = response.json()["checks"]["engine"]
    assert check["ok"] is True
    return str(check["detail"])


def test_a_killed_engine_restarts_while_the_retriever_answers(
    healing: TestClient, healing_app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    app = healing_app
    assert _rerank(healing, user_id="u1")["prompt_tokens"] is not None  # LLM-scored before
    assert _engine_check(healing) == "alive"
    generated = metric(app, GENERATIONS, outcome="ok")
    old = _engine_core(app)
    _past_the_crash_loop_window(app)
    # a new user's preference is generated in the background: its generation starts as the engine is killed
    assert _rerank(healing, user_id="new-heal-1", history=HISTORY)["degraded"] == ["preference_pending"]
    old.kill()
    killed = time.monotonic()

    answers, details = [], []
    recovered = None
    while time.monotonic() - killed < RECOVERY_LIMIT_S:
        answer = _rerank(healing, user_id="u1")
        answers.append(answer)
        details.append(_engine_check(healing))
        assert healing.get("/livez").status_code == 200
        if answer["prompt_tokens"] is not None and not answer["degraded"]:
            recovered = time.monotonic() - killed
            break
        if len(answers) == 3:  # a new user while the engine restarts: its generation waits for the engine
            pending = _rerank(healing, user_id="new-heal-2", history=HISTORY)
            assert pending["degraded"] == ["llm_unavailable", "preference_pending"], pending["degraded"]
        time.sleep(0.3)
    assert recovered is not None, f"no LLM-scored answer {RECOVERY_LIMIT_S} s after the kill; readyz: {details[-3:]}"
    print(f"\nengine killed -> first LLM-scored answer: {recovered:.1f} s ({len(answers)} answers meanwhile)")

    # meanwhile: the retriever's answers, flagged, and /readyz saying the engine restarts
    down = answers[:-1]
    assert down and all(a["degraded"] == ["llm_unavailable"] and a["prompt_tokens"] is None for a in down)
    assert all(a["results"] for a in down)
    assert any(d.startswith("restarting (attempt 1, ") for d in details), details
    assert _engine_check(healing) == "alive (restarted 1 time)"
    assert metric(app, "dpo4rec_engine_restarts_total", job="rerank") == 1
    assert metric(app, "dpo4rec_engine_state", job="rerank", state="alive") == 1
    assert metric(app, "dpo4rec_engine_state", job="rerank", state="restarting") == 0
    assert not old.is_running() and _engine_core(app).pid != old.pid  # the old one gone, a new one serving

    # none of the background generations was lost: each ran (again) once the engine was back
    assert _wait(lambda: metric(app, GENERATIONS, outcome="ok") >= generated + 2, timeout_s=120)
    assert metric(app, GENERATIONS, outcome="dropped") == 0
    for user in ("new-heal-1", "new-heal-2"):
        assert _rerank(healing, user_id=user, history=HISTORY)["preference_source"] == "cache"
    retried = [r.getMessage() for r in caplog.records if "tried again once the engine is back" in r.getMessage()]
    print(f"generations the engine died under, tried again once it was back: {len(retried)} {retried}")


def test_livez_fails_once_restarts_keep_failing(healing: TestClient, healing_app: FastAPI, tmp_path: Path) -> None:
    app = healing_app
    supervisor = app.state.service.supervisor
    assert healing.get("/livez").json() == {"status": "ok"}
    (slot,) = supervisor.engines
    slot.config = dataclasses.replace(slot.config, model=str(tmp_path / "no-such-model"))  # every restart fails
    _past_the_crash_loop_window(app)
    _engine_core(app).kill()

    def failing() -> dict[str, Any] | None:
        response = healing.get("/livez")
        return response.json() if response.status_code == 503 else None

    body = _wait(failing, timeout_s=60)
    assert body is not None, f"/livez stayed 200; engine: {_engine_check(healing)}"
    assert body["status"] == "failing" and "2 failures in a row" in body["detail"], body
    assert "no-such-model" in body["detail"], body  # the last failure: the restart could not start the engine
    assert _engine_check(healing).startswith("failed: 2 failures in a row")  # /readyz: still 200
    assert metric(app, "dpo4rec_engine_state", job="preference", state="failed") == 1
    # the retriever still answers, and a generation that can no longer run is dropped, counted
    assert _rerank(healing, user_id="u1")["degraded"] == ["llm_unavailable"]
    assert "preference_pending" in _rerank(healing, user_id="new-heal-3", history=HISTORY)["degraded"]
    assert _wait(lambda: metric(app, DROPPED, reason="engine_failed") == 1, timeout_s=30)
    assert metric(app, GENERATIONS, outcome="dropped") == 1


def test_shutdown_during_a_restart_stops_the_supervisor(tiny_run_dir: Path) -> None:
    # a long back-off: the app closes while its supervisor waits to restart the killed engine
    from service.main import create_app

    app = create_app(base_settings(tiny_run_dir, engine_restart_backoff_s=120.0, engine_restart_backoff_max_s=120.0))
    with TestClient(app) as client:
        supervisor = app.state.service.supervisor
        (slot,) = supervisor.engines
        core = _engine_core(app)
        pids = set(slot.pids)
        core.kill()
        assert _wait(lambda: _engine_check(client).startswith("restarting (attempt 1, next in"), timeout_s=30)
        closing = time.monotonic()
    print(f"\nclosed in {time.monotonic() - closing:.1f} s, a restart scheduled 120 s ahead not made")
    assert supervisor._watching.done() and not supervisor._heals  # nothing left to restart anything
    assert slot.restarts == 0 and metric(app, "dpo4rec_engine_restarts_total", job="rerank") == 0
    assert _wait(lambda: not any(_running(pid) for pid in pids), timeout_s=30), "engine processes left running"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_back_off_doubles_up_to_its_cap_and_the_state_reads_as_readyz_says() -> None:
    policy = RestartPolicy(backoff_s=1.0, backoff_max_s=10.0, max_failures=5)
    assert [policy.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    slot = SupervisedEngine(config=None, jobs=("rerank",))  # type: ignore[arg-type]  # describe reads no config
    slot.state, slot.attempt, slot.next_at = "restarting", 2, 103.04
    assert slot.describe(now=100.0) == "restarting (attempt 2, next in 3.0 s)"
    slot.next_at = None
    assert slot.describe(now=100.0) == "restarting (attempt 2, starting)"
    slot.state, slot.restarts = "alive", 3
    assert slot.describe(now=100.0) == "alive (restarted 3 times)"


def test_settings_refuse_a_back_off_cap_below_the_first_wait(tiny_run_dir: Path) -> None:
    with pytest.raises(ValueError, match="DPO4REC_ENGINE_RESTART_BACKOFF_MAX_S"):
        base_settings(tiny_run_dir, engine_restart_backoff_s=5.0, engine_restart_backoff_max_s=1.0)
