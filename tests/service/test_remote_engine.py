"""The engine tier (SPEC section 11): a real ``vllm serve`` process started from ``dpo4rec engine``'s command, and
an app whose LLM jobs go to it (``DPO4REC_ENGINE_URL``, ``llm.remote.RemoteEngine``).

- the remote label scores equal the in-process engine's on the same prompts (the session app's engine: the same
  settings, the same tiny model), within ``TOLERANCE``; greedy preferences are the same text;
- a cancelled call (a deadline) is aborted on the server, not left running there;
- a server that serves other weights is refused at start, naming what it serves;
- a server that is stopped (SIGSTOP: slow) or killed mid-test gives flagged retriever answers, never a 5xx.

The server is a subprocess in its own process group (killed as a group at the end).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from llm.engine import ascore_labels
from llm.prompts import HistoryItem
from tests.service.support import base_settings, run_async

# log-probs of the same prompt from the two engines: same weights and settings, so equal (measured: 0.0 on this
# machine, bf16); the tolerance leaves room for a GPU, where a prompt batched with others may round differently
TOLERANCE = 0.02
SERVER_START_S = 300  # vLLM start on 2 busy cores: a bound, not a timing assertion
Server = subprocess.Popen[bytes]
HISTORY = [HistoryItem(title=f"Night River {i} (199{i})", rating=4.0) for i in range(1, 6)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except OSError as e:
        return getattr(e, "code", 0) or 0, str(e)


@pytest.fixture(scope="module")
def server(
    tiny_run_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``vllm serve`` as ``dpo4rec engine`` starts it for the tiny run, with the session app's settings."""
    from service.engines import engine_command

    port = _free_port()
    argv, env = engine_command(base_settings(tiny_run_dir), tiny_run_dir, "all", "127.0.0.1", port)
    log = tmp_path_factory.mktemp("engine") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env={**env, **os.environ}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while _get(url + "/health")[0] != 200:
        if process.poll() is not None or time.monotonic() - started > SERVER_START_S:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(1.0)
    try:
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)  # a stopped server cannot handle SIGTERM
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def remote_app(tiny_run_dir: Path, server: tuple[str, Any]) -> FastAPI:
    from service.main import create_app

    return create_app(base_settings(tiny_run_dir, engine_url=server[0], engine_wait_s=5.0))


@pytest.fixture(scope="module")
def remote(remote_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(remote_app) as c:
        yield c


def _server_metric(url: str, name: str, **labels: str) -> float:
    status, text = _get(url + "/metrics")
    assert status == 200, text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_remote_scores_and_preferences_equal_the_in_process_engine(
    remote: TestClient, remote_app: FastAPI, client: TestClient, app: FastAPI
) -> None:
    local_llm, remote_llm = app.state.service.llm, remote_app.state.service.llm
    assert type(remote_llm.engines["rerank"]).__name__ == "RemoteEngine"
    assert remote_llm.engines["rerank"] is remote_llm.engines["preference"]  # one server: one engine, as in process
    assert type(local_llm.engines["rerank"]).__name__ == "AsyncLLM"
    scoring = app.state.service.pipeline.scoring
    candidates = [HistoryItem(title=f"Golden Star {i} ({1960 + 7 * i})") for i in range(8)]
    prompts = [
        local_llm.rerank_prompts(f"Likes {genre} films.", HISTORY[:k], candidates, scoring)
        for k, genre in enumerate(("drama", "horror", "comedy"), start=1)
    ]

    def scores(client_: TestClient, llm: Any) -> list[np.ndarray]:
        async def run() -> list[np.ndarray]:
            engine = llm.engines["rerank"]
            return list(
                await asyncio.gather(
                    *(
                        ascore_labels(engine, ids, p.label_ids, f"cmp-{i}")
                        for i, p in enumerate(prompts)
                        for ids in p.token_ids
                    )
                )
            )

        return run_async(client_, run)

    local, far = scores(client, local_llm), scores(remote, remote_llm)
    largest = max(float(np.max(np.abs(a - b))) for a, b in zip(local, far, strict=True))
    print(f"\nlargest |remote - in-process| label log-prob: {largest:.2e}")
    for a, b in zip(local, far, strict=True):
        assert a.shape == b.shape == (8,)
        assert np.isfinite(b).all() and abs(np.exp(b).sum() - 1) < 1e-3  # after the label mask, as in process
        assert np.max(np.abs(a - b)) < TOLERANCE, (a, b)
        assert int(np.argmax(a)) == int(np.argmax(b))

    from llm.engine import GenerationConfig, agenerate

    greedy = GenerationConfig(max_tokens=24)
    texts = [local_llm.token_ids(p.prompts[0]) for p in prompts] + [list(range(400, 440))]

    def generated(client_: TestClient, llm: Any) -> list[str]:
        async def run() -> list[str]:
            engine = llm.engines["preference"]
            lora = llm.loras.get("preference")  # remote: the job's weights by served name
            return [(await agenerate(engine, ids, greedy, f"gen-{n}", lora))[0] for n, ids in enumerate(texts)]

        return run_async(client_, run)

    local_texts, remote_texts = generated(client, local_llm), generated(remote, remote_llm)
    assert any(t.strip() for t in local_texts), local_texts  # the tiny model says something somewhere
    assert remote_texts == local_texts  # greedy decoding: the same tokens


def test_an_answer_through_the_remote_engine_is_llm_scored(remote: TestClient, server: tuple[str, Any]) -> None:
    before = _server_metric(server[0], "vllm:prompt_tokens_total")
    answer = remote.post("/rerank", json={"user_id": "u1", "top_n": 3, "deadline_ms": 30_000})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["degraded"] == [] and body["prompt_tokens"] and body["scored_by"] != "retriever", body
    assert _server_metric(server[0], "vllm:prompt_tokens_total") >= before + body["prompt_tokens"]
    engine = remote.get("/readyz").json()["checks"]["engine"]
    assert engine["ok"] and "answering" in engine["detail"], engine


def test_a_cancelled_call_is_aborted_on_the_server(
    remote: TestClient, remote_app: FastAPI, server: tuple[str, Any]
) -> None:
    from llm.engine import GenerationConfig, agenerate

    url = server[0]
    finished = _server_metric(url, "vllm:request_success_total")  # every finish reason but an abort
    engine = remote_app.state.service.llm.engines["preference"]

    async def cancel_early() -> None:
        long = GenerationConfig(max_tokens=900)  # seconds of decoding
        task = asyncio.ensure_future(agenerate(engine, list(range(300, 340)), long, "cancel-me"))
        await asyncio.sleep(0.5)
        assert engine.get_num_unfinished_requests() == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run_async(remote, cancel_early)
    assert engine.get_num_unfinished_requests() == 0
    generated, steady_since = _server_metric(url, "vllm:generation_tokens_total"), time.monotonic()
    while time.monotonic() - steady_since < 3.0:  # until the server has generated nothing for 3 s
        time.sleep(0.5)
        now = _server_metric(url, "vllm:generation_tokens_total")
        if now != generated:
            generated, steady_since = now, time.monotonic()
    # the request never finished (an abort is not a success), and the server stopped generating for it
    assert _server_metric(url, "vllm:request_success_total") == finished


def test_a_server_without_this_runs_weights_is_refused(tiny_run_dir: Path, server: tuple[str, Any]) -> None:
    from llm.remote import RemoteEngine, RemoteEngineError

    async def open_other() -> None:
        engine = RemoteEngine(server[0], "rerank-0123456789ab")
        try:
            await engine.open()
        finally:
            await engine.aclose()

    with pytest.raises(RemoteEngineError, match=re.escape("not 'rerank-0123456789ab'")):
        asyncio.run(open_other())


def test_a_stopped_or_killed_server_gives_flagged_answers_and_no_5xx(
    remote: TestClient, server: tuple[str, Server]
) -> None:
    url, process = server
    os.killpg(process.pid, signal.SIGSTOP)  # slow: the server takes the connections and never answers
    try:
        slow = remote.post("/rerank", json={"user_id": "u2", "top_n": 3, "deadline_ms": 1500})
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    assert slow.status_code == 200, slow.text
    assert slow.json()["prompt_tokens"] is None and slow.json()["degraded"], slow.json()
    assert slow.json()["results"]

    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    for user in ("u3", "u4", "u5"):
        down = remote.post("/rerank", json={"user_id": user, "top_n": 3, "deadline_ms": 5000})
        assert down.status_code == 200, down.text
        body = down.json()
        assert body["degraded"] == ["llm_unavailable"] and body["prompt_tokens"] is None, body
        assert body["results"]
    ready = remote.get("/readyz")
    assert ready.status_code == 200  # the pod answers correctly: the engine tier's own probes restart its pods
    assert "not answering" in ready.json()["checks"]["engine"]["detail"]
    assert remote.get("/livez").status_code == 200


def test_dpo4rec_engine_prints_the_server_the_service_asks_for(tiny_run_dir: Path) -> None:
    from typer.testing import CliRunner

    from dpo4rec.cli import app as cli
    from rundir.manifest import read_manifest
    from rundir.spec import load_llm_spec
    from service.engines import served_name
    from service.settings import Settings

    shown = CliRunner().invoke(cli, ["engine", "--run", str(tiny_run_dir), "--port", "8123", "--print"])
    assert shown.exit_code == 0, shown.output
    settings, spec, manifest = (
        Settings(run_dir=tiny_run_dir),
        load_llm_spec(tiny_run_dir, []),
        read_manifest(tiny_run_dir),
    )
    names = [served_name(settings, spec, manifest, job) for job in ("preference", "rerank")]
    assert f"--served-model-name {names[0]} {names[1]} " in shown.output
    assert "--logprobs-mode processed_logprobs" in shown.output and "--port 8123" in shown.output
    assert "OMP_WAIT_POLICY=PASSIVE" in shown.output  # the engine's environment, as in process

    wrong = CliRunner().invoke(cli, ["engine", "--run", str(tiny_run_dir), "--job", "ranker", "--print"])
    assert wrong.exit_code == 2 and "unknown job 'ranker'" in wrong.output
