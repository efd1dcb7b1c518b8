"""A run root: versioned run directories and a ``current`` pointer that writers move atomically.

After TensorFlow Serving's model base path (one folder per version): ::

    runs/prod/
      current -> ml-100k-20261206-120000+items-1   a relative symlink, replaced in one rename
      ml-100k-20261206-113000/                     each a complete run directory (manifest.json)
      ml-100k-20261206-120000+items-1/
      .history                                     versions ``current`` pointed at, oldest first (rollback)

Everything that reads a run takes either a root (it reads ``current``) or a single run directory (served
as before). A version is written whole into the root first (``rundir.manifest.staging_dir``) and only then
published, so a reader following ``current`` never sees half a run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rundir.manifest import MANIFEST, RunDirError, atomic_write_text

CURRENT = "current"
HISTORY = ".history"


def version_prefix(config: str) -> str:
    """How ``dpo4rec train --root`` names a version of ``config`` (a name or a YAML path): this, then a time
    stamp (``STAMP``); the background training reads it to tell whether a configuration was trained into a root."""
    return f"{config.replace('/', '_').removesuffix('.yaml')}-"


STAMP = "%Y%m%d-%H%M%S"  # the time stamp after ``version_prefix``


def trained_with(version: str, config: str) -> bool:
    """``version`` is a folder ``dpo4rec train --root`` wrote for ``config`` (prefix and time stamp), not any
    folder whose name starts alike (``chain-first`` is not a version of ``chain``)."""
    return re.fullmatch(re.escape(version_prefix(config)) + r"\d{8}-\d{6}", version) is not None


def is_root(path: Path) -> bool:
    """A run root: a folder with a ``current`` pointer (and no manifest of its own)."""
    return (Path(path) / CURRENT).is_symlink()


def resolve(path: Path) -> Path:
    """The run directory ``path`` stands for: itself, or its root's ``current`` version."""
    path = Path(path)
    if is_root(path):
        target = (path / CURRENT).resolve()
        if not (target / MANIFEST).is_file():
            raise RunDirError(f"{path / CURRENT} points at {target}, which is not a complete run directory")
        return target
    return path


def current_version(root: Path) -> str:
    """The name of the version ``current`` points at."""
    return os.readlink(Path(root) / CURRENT)


def versions(root: Path) -> list[str]:
    """The complete versions in a root, oldest first (by modification time)."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]


def history(root: Path) -> list[str]:
    path = Path(root) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def publish(root: Path, version: str) -> None:
    """Point ``current`` at ``root/version`` in one rename (a reader sees the old or the new, never neither)."""
    root = Path(root)
    if not (root / version / MANIFEST).is_file():
        raise RunDirError(f"{root / version} is not a complete run directory; nothing published")
    link = root / f".{CURRENT}.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(version)  # relative: the root can be moved or mounted elsewhere
    os.replace(link, root / CURRENT)
    past = history(root)
    if not past or past[-1] != version:
        atomic_write_text(root / HISTORY, json.dumps([*past, version]))


def rollback(root: Path) -> str:
    """Move ``current`` back to the version it pointed at before the last move; returns that version."""
    root = Path(root)
    if not is_root(root):
        raise RunDirError(f"{root} is not a run root (no {CURRENT} pointer): nothing to roll back")
    past = [v for v in history(root) if (root / v / MANIFEST).is_file()]
    now = current_version(root)
    while past and past[-1] == now:
        past.pop()
    if not past:
        raise RunDirError(f"{root}: no earlier version to roll back to (current is {now})")
    previous = past[-1]
    publish(root, previous)
    atomic_write_text(root / HISTORY, json.dumps(past))  # the rolled-back version leaves the history
    return previous


def init_root(root: Path, run_dir: Path) -> str:
    """Make ``root`` a run root serving an existing run directory (moved into it); returns its version."""
    root, run_dir = Path(root), Path(run_dir)
    if is_root(root):
        raise RunDirError(f"{root} is already a run root")
    version = run_dir.name
    root.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, root / version)
    publish(root, version)
    return version
