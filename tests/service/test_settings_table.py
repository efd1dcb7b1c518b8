"""Settings from one place: every field described, the README's tables generated from those descriptions,
and no ``DPO4REC_*`` or ``RAY_ADDRESS`` variable read past a pydantic-settings class."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest

from dpo4rec.batch import RaySettings
from scripts.settings_table import README, TABLES, block, rendered

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("retrieval", "llm", "service", "training", "dpo4rec", "rundir", "loadtests")

# Reads that stay. llm/vllm_plugin.py runs inside the processes vLLM spawns (its engine core and workers),
# where no Settings exist and only the environment arrives: llm.engine._engine_env puts
# Settings.engine_ipc_busy_loop_s into the engine's environment under this name, and the plugin reads it
# back there. It is a hand-off to vLLM's own processes, not a second way to configure the service. (The
# rest of llm/engine.py only writes vLLM's and OpenMP's own variables, ENGINE_ENV_DEFAULTS and
# OMP_WAIT_POLICY, for vLLM to read; those are not ours and not matched below.)
ALLOWED = {("llm/vllm_plugin.py", "DPO4REC_VLLM_IPC_BUSY_LOOP_S")}


@pytest.mark.parametrize("cls", TABLES.values(), ids=list(TABLES))
def test_every_setting_has_a_description(cls):
    for name, field in cls.model_fields.items():
        assert field.description and field.description.strip(), f"{cls.__name__}.{name} has no description"
        if _optional(field.annotation) and field.validation_alias is None:
            assert "null" in field.description, f"{cls.__name__}.{name}: say what null means in its description"


def test_readme_tables_are_generated_from_the_descriptions():
    text = README.read_text(encoding="utf-8")
    for name in TABLES:
        assert block(text, name) == rendered(name), (
            f"README.md's {name} block differs from the settings' descriptions: "
            "run `python -m scripts.settings_table --write`"
        )


def test_ray_values_come_from_their_variables(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("DPO4REC_RAY_ACTOR_CPUS", raising=False)
    assert RaySettings().address is None and RaySettings().actor_cpus == 1.0
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("DPO4REC_RAY_ACTOR_CPUS", "0.5")
    assert RaySettings().address == "ray://head:10001" and RaySettings().actor_cpus == 0.5


def test_environment_is_read_through_settings_only():
    found = set()
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in env_reads(path.read_text(encoding="utf-8")):
            if name.startswith("DPO4REC_") or name == "RAY_ADDRESS":
                found.add((rel, name, line))
    assert {(rel, name) for rel, name, _ in found} >= ALLOWED, "an allowed read is gone: drop it from ALLOWED"
    stray = sorted(f"{rel}:{line}: {name}" for rel, name, line in found if (rel, name) not in ALLOWED)
    assert not stray, f"read these through a pydantic-settings class, not os.environ: {stray}"


def test_env_reads_sees_every_form():
    source = """
import os
from os import environ, getenv
KEY = "DPO4REC_A"
os.environ.get(KEY); os.getenv("DPO4REC_B"); os.environ["RAY_ADDRESS"]; environ.get("DPO4REC_C")
getenv(f"DPO4REC_{KEY}"); os.environ["DPO4REC_SET"] = "1"; os.environ.get(unknown)
"""
    assert sorted(name for _, name in env_reads(source)) == [
        "DPO4REC_*",
        "DPO4REC_A",
        "DPO4REC_B",
        "DPO4REC_C",
        "RAY_ADDRESS",
    ]


# ---- helpers ------------------------------------------------------------------------------------------


def _optional(annotation: object) -> bool:
    return type(None) in get_args(annotation)  # X | None (pydantic resolves the annotations)


def env_reads(source: str) -> Iterator[tuple[int, str]]:
    """``(line, variable)`` of every ``os.environ.get``, ``os.getenv`` and ``os.environ[...]`` read whose key
    is a literal, a module-level string constant or an f-string (``PREFIX*``). A key computed at run time
    (``loadtests/run.py`` copying every ``DPO4REC_*`` into its report) is not a setting read and is skipped."""
    tree = ast.parse(source)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def key(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        head = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else None
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            return f"{head.value}*"
        return None

    def is_environ(node: ast.expr) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ" and _is_name(node.value, "os")) or (
            _is_name(node, "environ")
        )

    for node in ast.walk(tree):
        arg: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            environ_get = isinstance(func, ast.Attribute) and func.attr == "get" and is_environ(func.value)
            getenv = _is_name(func, "getenv") or (
                isinstance(func, ast.Attribute) and func.attr == "getenv" and _is_name(func.value, "os")
            )
            arg = node.args[0] if environ_get or getenv else None
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_environ(node.value):
            arg = node.slice
        name = key(arg) if arg is not None else None
        if name is not None:
            yield getattr(node, "lineno", 0), name


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name
