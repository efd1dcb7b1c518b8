"""The import rules of the design (docs/ARCHITECTURE.md): package directions, no import cycle, and the run
directory read and written only through ``rundir``.

Directions: ``llm`` and ``retrieval`` import no other project package (nor each other); ``rundir`` sits on
them; ``training`` and ``service`` sit on ``rundir`` and never import each other; ``dpo4rec`` (the CLI and
the batch jobs), ``benchmarks``, ``loadtests`` and ``scripts`` are on top. Imports inside functions count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm", "retrieval", "rundir", "training", "service", "dpo4rec", "benchmarks", "loadtests", "scripts")
FORBIDDEN = {
    "retrieval": {"llm", "rundir", "service", "training", "dpo4rec"},
    "llm": {"retrieval", "rundir", "service", "training", "dpo4rec"},
    "rundir": {"service", "training", "dpo4rec"},
    "service": {"training", "dpo4rec"},
    "training": {"service", "dpo4rec"},
}
# the files of a run directory (rundir/); outside rundir nothing names them
RUN_FILES = re.compile(
    r"""["'](manifest\.json|llm\.json|users\.json|preferences\.jsonl|preference_vectors\.npy|encoder\.json|"""
    r"""index\.faiss|catalog\.jsonl|adapters/[a-z]+)["']|/\s*["'](retriever|adapters|dpo)["']"""
)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_directions(package: str) -> None:
    modules = _modules()
    bad = {}
    for name, path in modules.items():
        if name.split(".")[0] == package:
            wrong = {m.split(".")[0] for m in _imported(path, modules)} & FORBIDDEN[package]
            if wrong:
                bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"imports against the design's direction: {bad}"


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imported(path, modules) - {name} for name, path in modules.items()}
    # a package's __init__ is imported with its modules; only module -> module edges make a cycle
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_run_directory_is_read_and_written_through_rundir() -> None:
    bad = []
    for name, path in _modules().items():
        if name.split(".")[0] == "rundir":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if RUN_FILES.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "run directory files named outside rundir:\n" + "\n".join(bad)
