"""Model rollout without downtime on a run root: under steady load, versions are swapped three times and a broken
one is offered once. No 5xx, every answer names the version that computed it and holds only that version's
items, the broken version is refused while the old one keeps serving, and the engines are shared."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dpo4rec.items import add_items, remove_items
from rundir.versions import current_version, init_root, publish, rollback
from tests.service.support import N_ITEMS, VERSION, base_settings, build_run_dir, metric, run_async

EVERYTHING = {"user_id": "u1", "top_n": N_ITEMS + 5}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("rollout")
    init_root(tmp / "root", build_run_dir(tmp / VERSION, tiny_llm_dir))
    return tmp / "root"


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    from service.main import create_app

    app = create_app(base_settings(root, reload_poll_s=None))  # reloads only when the test asks
    with TestClient(app) as c:
        yield c


def _broken(root: Path) -> None:
    """A copy of the served version with a file that no longer matches its manifest, published."""
    source = root / current_version(root)
    shutil.copytree(source, root / "broken")
    with open(root / "broken" / "catalog.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"item_id": "tampered", "title": "x"}) + "\n")
    publish(root, "broken")


def test_versions_swap_under_load_without_errors_or_mixed_answers(client, root, tmp_path):
    app = client.app
    new_items = tmp_path / "new.jsonl"
    new_items.write_text(json.dumps({"id": "n1", "title": "Golden Night 99 (2031)", "genres": ["Drama"]}) + "\n")
    steps = [
        lambda: add_items(root, new_items),  # v2: n1 in catalog and index
        lambda: remove_items(root, ["n1"]),  # v3: n1 out of retrieval again
        lambda: _broken(root),  # refused: the old version keeps serving
        lambda: rollback(root),  # v2 again (back from the broken pointer, then one more step)
    ]
    served = [VERSION]
    outcomes = []

    async def drill() -> list[tuple[int, dict]]:
        answers: list[tuple[int, dict]] = []
        stop = asyncio.Event()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:

            async def load() -> None:
                while not stop.is_set():
                    r = await http.post("/rerank", json=EVERYTHING)
                    answers.append((r.status_code, r.json()))

            workers = [asyncio.create_task(load()) for _ in range(4)]
            for step in steps:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(step)
                if step is steps[-1]:  # the broken pointer is still the last history entry: step back twice
                    await asyncio.to_thread(rollback, root)
                outcome = (await http.post("/admin/reload")).json()
                outcomes.append(outcome)
                if outcome["outcome"] == "swapped":
                    served.append(outcome["version"])
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)
        return answers

    answers = run_async(client, drill)
    assert [o["outcome"] for o in outcomes] == ["swapped", "swapped", "refused", "swapped"], outcomes
    assert "files differ from the manifest" in outcomes[2]["detail"] and outcomes[2]["version"] == served[2]
    assert len(answers) > 20 and {code for code, _ in answers} == {200}
    versions = {body["model_version"] for _, body in answers}
    assert versions <= set(served) and len(versions) >= 3  # answers came from each swapped-in version
    v2 = served[1]
    for _, body in answers:  # an answer holds the items of the version it names, no other
        ids = {r["item_id"] for r in body["results"]}
        assert ("n1" in ids) == (body["model_version"] == v2), body["model_version"]
    assert metric(app, "dpo4rec_reloads_total", outcome="swapped") == 3
    assert metric(app, "dpo4rec_reloads_total", outcome="refused") == 1
    state = app.state.service
    assert state.artifacts.version == served[-1] and state.shared.engines.started == 1  # one set of engines
    ready = client.get("/readyz").json()
    assert ready["checks"]["version"]["detail"].startswith(f"serving {served[-1]}; refused broken:")


@pytest.mark.parametrize("served", ["root", "root/current"])  # the second: k8s serves the /runs/current symlink
def test_the_poll_follows_current_without_an_admin_call(root, tmp_path, served):
    from service.main import create_app

    app = create_app(
        base_settings(root if served == "root" else root / "current", llm_enabled=False, reload_poll_s=0.2)
    )
    with TestClient(app) as lite:
        before = lite.post("/rerank", json={"user_id": "u2", "top_n": 3}).json()["model_version"]
        new_items = tmp_path / "more.jsonl"
        item = {"id": f"p-{served}", "title": "Wild River 5 (2032)", "genres": ["Action"]}
        new_items.write_text(json.dumps(item) + "\n")
        added = add_items(root, new_items)
        for _ in range(600):  # the poll runs every 0.2 s; loading a tiny version takes well under a second
            answer = lite.post("/rerank", json={"user_id": "u2", "top_n": 3}).json()
            if answer["model_version"] == added.version:
                break
            run_async(lite, lambda: asyncio.sleep(0.1))
        assert answer["model_version"] == added.version != before


def test_versions_share_engines_when_their_adapters_have_the_same_content(tmp_path):
    from rundir.manifest import write_manifest
    from rundir.reader import load_artifacts
    from service.runtime import EnginePool
    from service.telemetry import ServiceMetrics

    run = build_run_dir(tmp_path / "v1", llm_dir=tmp_path)
    (run / "adapters" / "rerank").mkdir(parents=True)
    (run / "adapters" / "rerank" / "adapter_model.safetensors").write_bytes(b"weights-1")
    spec = json.loads((run / "llm.json").read_text())
    spec["adapters"]["rerank"] = "adapters/rerank"
    (run / "llm.json").write_text(json.dumps(spec))
    write_manifest(run, version="v1", dataset="synthetic-tiny", config={})
    init_root(tmp_path / "root", run)
    new_items = tmp_path / "new.jsonl"
    new_items.write_text(json.dumps({"id": "n1", "title": "Golden Night 99 (2031)"}) + "\n")
    add_items(tmp_path / "root", new_items)  # a copy of the version, adapters included, at another path
    pool = EnginePool(base_settings(tmp_path / "root"), ServiceMetrics())
    first, second = load_artifacts(tmp_path / "root" / "v1"), load_artifacts(tmp_path / "root")
    assert first.llm.adapters["rerank"] != second.llm.adapters["rerank"]  # other folders...
    assert pool.key(first) == pool.key(second)  # ...same weights: the engines are shared
    (second.root / "adapters" / "rerank" / "adapter_model.safetensors").write_bytes(b"weights-2")
    write_manifest(second.root, version=second.version, dataset="synthetic-tiny", config={})
    assert pool.key(load_artifacts(second.root)) != pool.key(first)  # other weights: engines of their own
