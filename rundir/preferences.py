"""``preferences.jsonl`` (one ``{"user_id", "text"}`` line per user) and ``preference_vectors.npy`` (rows in
that order): written by training and by the batch refresh, read by the service and by later runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rundir.manifest import MANIFEST, RunDirError, atomic_write_text, read_manifest, sha256

TEXTS = "preferences.jsonl"
VECTORS = "preference_vectors.npy"


def save_preferences(folder: Path, texts: dict[str, str], vectors: np.ndarray) -> None:
    """Both files, user order = ``texts`` order, vectors as float32."""
    if vectors.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {vectors.shape[0]} vectors")
    with open(Path(folder) / TEXTS, "w", encoding="utf-8") as f:
        for user, text in texts.items():
            f.write(json.dumps({"user_id": user, "text": text}, ensure_ascii=False) + "\n")
    np.save(Path(folder) / VECTORS, vectors.astype(np.float32))


def load_preferences(folder: Path) -> tuple[dict[str, str], np.ndarray]:
    """Texts by user (file order) and their (U, D) float32 vectors; a bad line or a row count that does not
    match is a ``RunDirError`` naming the file (and the line)."""
    folder = Path(folder)
    texts: dict[str, str] = {}
    with open(folder / TEXTS, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                user, text = str(row["user_id"]), str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise RunDirError(f"{folder / TEXTS} line {n}: {e!r}") from None
            if user in texts:
                raise RunDirError(f"{folder / TEXTS} line {n}: user {user} appears twice")
            texts[user] = text
    vectors = np.load(folder / VECTORS).astype(np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise RunDirError(
            f"{folder}: {VECTORS} has shape {vectors.shape}, expected ({len(texts)}, D) (one row per line of {TEXTS})"
        )
    return texts, vectors


def replace_preferences(run_dir: Path, texts: dict[str, str], vectors: np.ndarray) -> None:
    """Rewrite a written run's preferences in place (the batch refresh): each file replaced by rename, then
    the manifest re-checksummed and marked ``preferences_refreshed`` (texts from full histories are not
    for offline evaluation). Idempotent: after a kill between the renames, the same call redoes it."""
    run_dir = Path(run_dir)
    if vectors.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {vectors.shape[0]} vectors")
    body = "".join(json.dumps({"user_id": u, "text": t}, ensure_ascii=False) + "\n" for u, t in texts.items())
    atomic_write_text(run_dir / TEXTS, body)
    tmp = run_dir / f".{VECTORS}.tmp.npy"
    np.save(tmp, vectors.astype(np.float32))
    os.replace(tmp, run_dir / VECTORS)
    manifest = read_manifest(run_dir)
    for name in (TEXTS, VECTORS):
        manifest["files"][name] = sha256(run_dir / name)
    manifest["preferences_refreshed"] = True
    atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
