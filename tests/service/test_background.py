"""`dpo4rec serve --train-in-background CONFIG`: the next version trains at low priority while the service
answers, /readyz says what it is doing, and the version it publishes is swapped in without a restart."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dpo4rec.cli import app as cli
from rundir.versions import current_version, trained_with, versions
from tests.service.support import base_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny import write_tiny_dataset  # noqa: E402


def _config(tmp_path: Path, name: str, epochs: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    data = write_tiny_dataset(tmp_path / "tiny")
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"name": str(data), "data_dir": str(tmp_path / "cache")},
                "llm": {"preference_source": "history", "history_items": 5},
                "retriever": {"epochs": epochs, "patience": epochs, "hidden": 16, "max_len": 8, "adaptor_hidden": 8},
                "eval": {"bootstrap": 20},
            }
        )
    )
    return path


def test_the_next_version_trains_in_the_background_and_is_rolled_out_live(tmp_path):
    from service.main import create_app

    root = tmp_path / "root"
    first = CliRunner().invoke(
        cli, ["train", "--config", str(_config(tmp_path, "first", 1)), "--out", str(root), "--root"]
    )
    assert first.exit_code == 0, first.output
    v1 = current_version(root)
    later = _config(tmp_path, "later", 3)
    settings = base_settings(root, llm_enabled=False, reload_poll_s=None, background_train_config=str(later))
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.post("/rerank", json={"user_id": "u1", "top_n": 3}).json()["model_version"]
        details = []
        trainer = app.state.training.process
        assert psutil.Process(trainer.pid).nice() == 19  # the requests come first
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready = client.get("/readyz")
            assert ready.status_code == 200  # the pod answers throughout
            details.append(ready.json()["checks"]["training"]["detail"])
            if app.state.service.artifacts.root.name != v1:
                break
            time.sleep(0.5)
        answer = client.post("/rerank", json={"user_id": "u1", "top_n": 3}).json()
    v2 = current_version(root)
    assert v2 != v1 and v2.startswith(f"{str(later).replace('/', '_').removesuffix('.yaml')}-")
    assert versions(root) == [v1, v2] and answer["model_version"] == app_version(root, v2)
    assert any(": stage " in d for d in details), details  # /readyz showed the running stage
    assert app.state.training.process.returncode == 0


def app_version(root: Path, name: str) -> str:
    from rundir.reader import read_version

    return read_version(root / name)


def test_a_version_of_a_configuration_is_its_prefix_and_a_time_stamp():
    # "chain-first" starts like a version of "chain" but is not one: background training must still start
    assert trained_with("chain-20261206-173704", "chain")
    assert trained_with("configs_chain-20261206-173704", "configs/chain.yaml")
    assert not trained_with("chain-first", "chain")
    assert not trained_with("chain-20261206-173704", "chain-2")
    assert not trained_with("default-20261206-173704", "chain")
