"""The open-loop load generator (``benchmarks/open_loop.py``) against real local HTTP servers.

The servers are tiny HTTP/1.1 keep-alive responders (``asyncio.start_server``) in a thread of their own,
answering ``POST`` by the body's ``user_id``; nothing of httpx is faked. The timing bounds are loose (100 ms
against a server that holds every answer 1 s, on 2 shared cores) and only about the generator's own
sending, never about a server's speed.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.open_loop import LoadConfig, arrival_times, main, sweep

# user_id -> (status, body fields, delay s); "drop" closes the connection without an answer
MIX: dict[str, tuple[int, dict[str, Any], float]] = {
    "ok": (200, {"degraded": [], "prompt_tokens": 10}, 0.0),
    "shed": (200, {"degraded": ["llm_shed"], "prompt_tokens": None}, 0.0),
    "busy": (429, {"error": {"message": "busy"}}, 0.0),
    "fail": (500, {"error": {"message": "boom"}}, 0.0),
    "slow": (200, {"degraded": [], "prompt_tokens": 10}, 1.5),  # far past the SLO below, whatever the load
}


class TinyServer:
    """An HTTP/1.1 responder on 127.0.0.1 in a background thread; every answer waits ``delay_s`` at least."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.arrivals: list[float] = []  # perf_counter() of each request's arrival
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> TinyServer:
        self.thread.start()
        server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop)
        self.server = server.result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def shutdown(self) -> None:
        self.server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.arrivals.append(time.perf_counter())
                length = 0
                for line in head.decode().split("\r\n")[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                user = json.loads(await reader.readexactly(length)).get("user_id", "ok")
                if user == "drop":
                    return
                status, fields, delay = MIX.get(user, MIX["ok"])
                await asyncio.sleep(max(delay, self.delay_s))
                body = json.dumps({"request_id": "x", "model_version": "v1", "results": [], **fields}).encode()
                reply = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                writer.write(reply.encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def fast_server() -> Iterator[TinyServer]:
    with TinyServer() as server:
        yield server


def run_level(server: TinyServer, rate: float, duration_s: float, bodies: list[dict[str, Any]], **kw: Any) -> Any:
    cfg = LoadConfig(url=server.url, duration_s=duration_s, pause_s=0.0, timeout_s=5.0, **kw)
    return asyncio.run(sweep(cfg, [rate], bodies))


def test_slow_server_does_not_slow_arrivals(fast_server: TinyServer) -> None:
    """Arrivals follow the schedule, not the answers. Asserted without wall-clock bounds (the suite shares two
    cores with engines): the schedule is the same for both servers, and against a server that holds every
    answer 1 s, most of the 2 s level's requests are open at once, which a closed loop never does."""
    offsets = arrival_times(50, 2.0, seed=0)
    with TinyServer(delay_s=1.0) as slow_server:
        for name, server in (("slow", slow_server), ("fast", fast_server)):
            result = run_level(server, 50, 2.0, [{"user_id": "ok", "top_n": 10}], stop_factor=0.0)
            level, shots = result.levels[0], result.shots[0]
            assert level["sent"] == len(offsets) == 100
            assert [s.scheduled_s for s in shots] == offsets  # the same schedule (seed 0, level 0)
            assert level["statuses"] == {"200": 100} and len(server.arrivals) == 100
            if name == "slow":
                # every answer took >= 1 s, yet ~50 requests (1 s of the schedule) were open together
                assert level["latency_ms"]["p50"] >= 1000
                assert level["peak_in_flight"] >= 25, level["peak_in_flight"]


def test_arrival_times_mean_and_burstiness() -> None:
    rate = 200.0
    for burstiness in (1.0, 0.3, 4.0):
        offsets = arrival_times(rate, 100.0, burstiness, seed=1, normalize=False)
        gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
        assert len(gaps) == 20000
        assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05 if burstiness < 1 else 0.02)
    cv = {}
    for burstiness in (0.3, 1.0, float("inf")):
        offsets = arrival_times(rate, 100.0, burstiness, seed=2, normalize=False)
        gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
        cv[burstiness] = statistics.stdev(gaps) / statistics.fmean(gaps)
    assert cv[1.0] == pytest.approx(1.0, abs=0.05)  # Poisson: exponential gaps
    assert cv[0.3] > 1.5 > cv[1.0] > 0.5 > cv[float("inf")]  # 1/sqrt(0.3) = 1.83; inf: constant
    normalized = arrival_times(50, 2.0, 0.5, seed=3)  # as vLLM: exactly rate x duration, the last at duration
    assert len(normalized) == 100 and normalized[-1] == pytest.approx(2.0)
    assert normalized == sorted(normalized) and normalized[0] > 0


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_summary_counts_a_known_mix(fast_server: TinyServer, client: str) -> None:
    # 10 bodies cycled over 50 constant-rate requests: each kind 5 times, "ok" 25 times
    cycle = ["ok", "ok", "shed", "busy", "ok", "fail", "slow", "drop", "ok", "ok"]
    bodies = [{"user_id": user, "top_n": 10} for user in cycle]
    for llm in (False, True):
        # an SLO far above a fast answer's time on a loaded machine and far below the slow answers' 1.5 s
        kw: dict[str, Any] = {"burstiness": float("inf"), "slo_ms": 750.0, "llm": llm, "client": client}
        level = run_level(fast_server, 50, 1.0, bodies, **kw).levels[0]
        assert level["sent"] == 50
        assert level["statuses"] == {"-1": 5, "200": 35, "429": 5, "500": 5}
        assert level["error_share"] == pytest.approx(10 / 50)  # 500s and dropped connections
        assert level["connection_error_share"] == pytest.approx(5 / 50)
        assert level["http_429_share"] == pytest.approx(5 / 50)
        assert level["shed_share"] == pytest.approx(5 / 50)
        assert level["llm_scored_share"] == pytest.approx(30 / 50)  # ok + slow
        assert level["llm_goodput_rps"] == pytest.approx(25.0)  # ok only: slow is past the SLO
        assert level["goodput_rps"] == pytest.approx(25.0 if llm else 30.0)  # + shed when any 2xx counts
        assert level["degraded"] == {"llm_shed": 5}
        assert level["model_versions"] == {"v1": 35}  # read from 2xx bodies only
        assert level["p99_good_ms"] is None and not level["meets_slo"]  # 30-40 % without a good answer
        assert level["latency_ms"]["max"] >= 1500  # the slow answers, from their scheduled time


def test_sweep_headline_and_stop_rule(fast_server: TinyServer) -> None:
    body = [{"user_id": "ok"}]
    cfg = LoadConfig(url=fast_server.url, duration_s=0.5, slo_ms=200.0, pause_s=0.0, timeout_s=5.0)
    fast = asyncio.run(sweep(cfg, [20, 40], body))
    assert [lv["rate"] for lv in fast.levels] == [20, 40] and fast.headline_rps == 40
    with TinyServer(delay_s=0.5) as slow_server:  # every answer 0.5 s: p99 over 2 x 200 ms at the first level
        cfg = LoadConfig(url=slow_server.url, duration_s=0.5, slo_ms=200.0, pause_s=0.0, stop_factor=2.0)
        slow = asyncio.run(sweep(cfg, [20, 40, 80], body))
    assert len(slow.levels) == 1 and slow.headline_rps is None


def test_cli_writes_a_compact_summary(fast_server: TinyServer, tmp_path: Path) -> None:
    out, rows = tmp_path / "open_loop.json", tmp_path / "requests.jsonl"
    argv = ["--url", fast_server.url, "--user", "ok,shed", "--rates", "20,40", "--duration", "0.5"]
    main([*argv, "--slo-ms", "200", "--pause-s", "0", "--out", str(out), "--requests-log", str(rows)])
    report = json.loads(out.read_text())
    assert report["headline_rps"] == 40 and report["users"] == 2
    assert [lv["sent"] for lv in report["levels"]] == [10, 20]
    assert "shots" not in json.dumps(report) and "scheduled_s" not in json.dumps(report)
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(lines) == 30 and {line["status"] for line in lines} == {200}
