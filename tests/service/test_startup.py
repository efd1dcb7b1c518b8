"""Start-up and shutdown: a broken run is refused with a clear message; shutdown drains in-flight work."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.testclient import TestClient

from rundir.manifest import RunDirError
from service.main import create_app
from tests.service.support import API_KEY, base_settings, run_async


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tampered_run_is_refused(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path / "run")
    (run / "users.json").write_text(json.dumps({"u0": [1]}))
    app = create_app(base_settings(run, llm_enabled=False))
    with pytest.raises(RunDirError, match="differ from the manifest checksums: users.json"):
        with TestClient(app):
            pass


def test_partial_run_is_refused(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path / "run")
    (run / "index.faiss").unlink()
    app = create_app(base_settings(run, llm_enabled=False))
    with pytest.raises(RunDirError, match="partial: missing index.faiss"):
        with TestClient(app):
            pass


def test_shutdown_drains_in_flight_requests(tiny_run_dir):
    app = create_app(base_settings(tiny_run_dir, llm_enabled=False, warm_cache=False, api_keys=[API_KEY]))
    limiter = app.state.limiter

    async def scenario() -> tuple[bool, bool, int, int]:
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'{"user_id": "u1",'
            await release.wait()
            yield b' "top_n": 2}'

        headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            held = asyncio.create_task(http.post("/rerank", content=slow_body(), headers=headers))
            while limiter.count == 0:
                await asyncio.sleep(0.01)
            timed_out = await limiter.drain(0.05)  # still one in flight
            refused = await http.post("/rerank", json={"user_id": "u2"}, headers=headers)
            draining = asyncio.create_task(limiter.drain(10))
            release.set()
            finished = await held
            return timed_out, await draining, refused.status_code, finished.status_code

    with TestClient(app) as client:
        timed_out, drained, refused, finished = run_async(client, scenario)
        assert client.get("/readyz").status_code == 503  # draining: not ready for new work
    assert (timed_out, drained, refused, finished) == (False, True, 503, 200)


def test_a_run_saved_before_natural_titles_keeps_catalogue_order(tmp_path):
    """llm.json without prompt.natural_titles comes from before the setting: its adapters were trained on
    catalogue-order titles, so the service must not rewrite them; a run that says True gets them rewritten."""
    import json

    from rundir.reader import load_llm_spec

    raw = {"base_model": "smollm2-135m-instruct", "prompt": {"max_history": 10}}
    (tmp_path / "llm.json").write_text(json.dumps(raw))
    assert load_llm_spec(tmp_path, []).prompt.natural_titles is False
    raw["prompt"]["natural_titles"] = True
    (tmp_path / "llm.json").write_text(json.dumps(raw))
    assert load_llm_spec(tmp_path, []).prompt.natural_titles is True
