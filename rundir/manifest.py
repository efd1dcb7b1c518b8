"""The manifest of a run directory, and the atomic writes every writer of one uses.

A run directory is written whole into a temporary sibling and renamed into place (``staging_dir``), so a
reader sees either nothing or a complete run. ``manifest.json`` records the format version, the data
set, the resolved configuration, the sha256 of every file and the headline metrics; :func:`verify`
refuses a partial or tampered directory with a message that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class RunDirError(RuntimeError):
    """A run directory that is missing, partial, or does not match its manifest."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(
    root: Path,
    *,
    version: str,
    dataset: str,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Checksum every file under ``root`` and write ``manifest.json`` (atomically)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "dataset": dataset,
        "config": config,
        "files": {str(p.relative_to(root)): sha256(p) for p in _files(root)},
        "metrics": metrics or {},
        **(extra or {}),
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise RunDirError(f"run directory {root} does not exist")
    if not path.is_file():
        raise RunDirError(f"{root} has no {MANIFEST}: not a complete run directory (was training interrupted?)")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RunDirError(
            f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return manifest


def verify(root: Path, required: tuple[str, ...] = (), checksums: bool = True) -> dict[str, Any]:
    """The manifest of a complete run; raises :class:`RunDirError` naming what is missing or changed."""
    root = Path(root)
    manifest = read_manifest(root)
    files: dict[str, str] = manifest.get("files", {})
    missing = [name for name in (*required, *files) if not (root / name).is_file()]
    if missing:
        raise RunDirError(f"{root} is partial: missing {', '.join(sorted(set(missing)))}")
    not_listed = [name for name in required if name not in files]
    if not_listed:
        raise RunDirError(f"{root}: manifest does not list {', '.join(not_listed)}")
    if checksums:
        changed = [name for name, digest in files.items() if sha256(root / name) != digest]
        if changed:
            raise RunDirError(f"{root}: files differ from the manifest checksums: {', '.join(changed)}")
    return manifest


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staging_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temp directory beside ``final`` that becomes ``final`` when the block ends without error."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise RunDirError(f"{final} already exists; pass overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
