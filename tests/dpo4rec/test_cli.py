"""The CLI on a run root: `train --root` writes versions and moves `current`; `rollback` moves it back."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dpo4rec.cli import app
from rundir.reader import load_artifacts
from rundir.versions import current_version, versions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny import write_tiny_dataset  # noqa: E402


def test_train_into_a_run_root_publishes_each_version_and_rollback_returns(tmp_path):
    data = write_tiny_dataset(tmp_path / "tiny")
    config = tmp_path / "fast.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"name": str(data), "data_dir": str(tmp_path / "cache")},
                "llm": {"preference_source": "history", "history_items": 5},  # no LLM stage
                "retriever": {"epochs": 2, "patience": 2, "hidden": 16, "max_len": 8, "adaptor_hidden": 8},
                "eval": {"bootstrap": 20},
            }
        )
    )
    root = tmp_path / "root"
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--config", str(config), "--out", str(root), "--root"])
    assert first.exit_code == 0, first.output
    v1 = current_version(root)
    served = load_artifacts(root)
    assert served.content is not None  # the content tower is part of every run
    assert served.llm.scoring.weight == 0.0  # no re-rank stage measured the LLM's order: the retriever's is served
    second = runner.invoke(app, ["train", "--config", str(config), "--out", str(root)])  # a root: no flag needed
    assert second.exit_code == 0, second.output
    v2 = current_version(root)
    assert v2 != v1 and versions(root) == [v1, v2]
    back = runner.invoke(app, ["rollback", str(root)])
    assert back.exit_code == 0 and current_version(root) == v1
