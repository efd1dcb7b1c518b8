"""``dpo4rec items add|remove``: new items in the catalog, and items out of retrieval, without retraining; and
``dpo4rec coldstart --apply``: the per-slice fusion weights the cold-start protocol chose, into a new version.

``add`` reads a JSONL or CSV file of new items (id, title, genres, year), maps each item's text through the
run's content tower (``retrieval.content``) into the retriever's item space, and writes a new run version
whose catalog, retriever embedding table and FAISS index hold them: they are retrieved, scored and read in
histories like trained items. ``remove`` takes items out of retrieval (they stay in the catalog, so
histories that hold them still read). Both write a whole new run directory (staged, then renamed): into a
run root, where ``current`` then moves to it (``rundir.versions``), or to ``--out`` for a single run
directory. Bad input names the file and line, and nothing is written.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.catalog import Catalog, Item
from retrieval.content import fit_text_tower, text_vectors
from retrieval.encoder import TextEncoder
from rundir.manifest import RunDirError
from rundir.reader import Artifacts, load_artifacts, read_item_changes
from rundir.versions import is_root, publish, resolve
from rundir.writer import derive_run

log = logging.getLogger(__name__)

FIELDS = {"id", "item_id", "title", "genres", "categories", "year"}


class ItemsFileError(ValueError):
    """A file of new items that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class ItemsResult:
    run_dir: Path  # the new version's directory
    version: str
    added: list[str]
    removed: list[str]
    seconds: float


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, raw row) from a JSONL or CSV file."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row:  # more cells than the header names
                    raise ItemsFileError(f"{path}:{reader.line_num}: more values than the header has columns")
                yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ItemsFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ItemsFileError(f"{path}:{n}: expected an object with id, title, genres, year")
            yield n, row


def _item(path: Path, n: int, row: dict[str, Any]) -> Item:
    where = f"{path}:{n}"
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        raise ItemsFileError(f"{where}: unknown field {', '.join(unknown)} (known: id, title, genres, year)")
    item_id = row.get("id", row.get("item_id"))
    if item_id is None or not str(item_id).strip():
        raise ItemsFileError(f"{where}: missing id")
    title = row.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ItemsFileError(f"{where}: item {item_id}: missing title")
    genres = row.get("genres", row.get("categories")) or []
    if isinstance(genres, str):
        genres = [g.strip() for g in genres.replace("|", ",").split(",") if g.strip()]
    if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
        raise ItemsFileError(f"{where}: item {item_id}: genres must be a list of strings or 'A|B' text")
    year = row.get("year")
    try:
        year = None if year is None else int(year)
    except (TypeError, ValueError):
        raise ItemsFileError(f"{where}: item {item_id}: year {year!r} is not a whole number") from None
    return Item(str(item_id).strip(), title.strip(), tuple(genres), year)


def read_new_items(path: Path, catalog: Catalog) -> list[Item]:
    """The items of ``path``; a malformed line, a missing title, an unknown field, an id twice in the file or
    one the catalog already has is an :class:`ItemsFileError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ItemsFileError(f"{path}: no such file")
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for n, row in _rows(path):
        item = _item(path, n, row)
        if item.item_id in first_line:
            raise ItemsFileError(f"{path}:{n}: duplicate id {item.item_id} (first on line {first_line[item.item_id]})")
        if item.item_id in catalog:
            raise ItemsFileError(f"{path}:{n}: id {item.item_id} is already in the catalog")
        first_line[item.item_id] = n
        items.append(item)
    if not items:
        raise ItemsFileError(f"{path}: no items")
    return items


def add_items(run: Path, file: Path, out: Path | None = None) -> ItemsResult:
    """A new run version with the items of ``file`` in catalog, retriever and index (see the module doc)."""
    began = datetime.now(timezone.utc)
    art = load_artifacts(run)
    items = read_new_items(file, art.catalog)
    encoder = TextEncoder(art.encoder_config)
    tower = art.content
    if tower is None:  # a run written before the tower: fit it now from the run's own histories
        warm = sorted({i for history in art.users.values() for i in history})
        tower = fit_text_tower(encoder, art.catalog, warm, art.retriever.item_vectors())
        log.info("this run had no content tower: fit one on %d warm items (alpha %g)", len(warm), tower.alpha)
    vectors = text_vectors(tower, encoder, items)  # (M, H)
    catalog = Catalog([*(art.catalog[i] for i in range(1, len(art.catalog) + 1)), *items])
    retriever = art.retriever.with_items(vectors)
    changes = read_item_changes(art.root)
    changes["added"] += [i.item_id for i in items]
    return _new_version(art, run, out, "items", changes, began, catalog=catalog, retriever=retriever, content=tower)


def remove_items(run: Path, item_ids: Sequence[str], out: Path | None = None) -> ItemsResult:
    """A new run version in which ``item_ids`` are never retrieved (they stay in the catalog for histories)."""
    began = datetime.now(timezone.utc)
    art = load_artifacts(run)
    unknown = [i for i in item_ids if i not in art.catalog]
    if unknown:
        raise ItemsFileError(f"not in the catalog of {art.root}: {', '.join(unknown[:20])}")
    changes = read_item_changes(art.root)
    removed = [i for i in dict.fromkeys(item_ids) if i not in changes["removed"]]
    changes["removed"] += removed
    return _new_version(art, run, out, "removed", changes, began)


def _new_version(
    art: Artifacts,
    run: Path,
    out: Path | None,
    tag: str,
    changes: dict[str, list[str]],
    began: datetime,
    **replaced: Any,
) -> ItemsResult:
    """Write the served version with ``replaced`` parts (``rundir.writer.derive_run``) under a new version name,
    then publish it (a run root) or leave it at ``out``."""
    root_mode = is_root(Path(run))
    if not root_mode and out is None:
        raise RunDirError(
            f"{run} is a single run directory: give --out for the new version, or serve a run root "
            "(`dpo4rec runs init`) whose current pointer moves"
        )
    stamp = f"{art.version.split('+')[0]}+{tag}-{began.strftime('%Y%m%d-%H%M%S')}"
    version, n = stamp, 2
    while root_mode and (Path(run) / version).exists():  # two changes in one second
        version, n = f"{stamp}-{n}", n + 1
    final = Path(run) / version if root_mode else Path(out)  # type: ignore[arg-type]
    derive_run(art, final, version=version, changes=changes, **replaced)
    if root_mode:
        publish(Path(run), version)
    seconds = (datetime.now(timezone.utc) - began).total_seconds()
    log.info("wrote %s (version %s) in %.1f s", final, version, seconds)
    before = read_item_changes(art.root)
    added = [i for i in changes["added"] if i not in before["added"]]
    removed = [i for i in changes["removed"] if i not in before["removed"]]
    return ItemsResult(resolve(final), version, added, removed, seconds)


PROTOCOL_SLICES = {  # training.cold_start's slice names -> the service's (llm.scoring slices)
    "new-items shelf": "new_items_shelf",
    "new items in the catalog": "new_items",
    "new users k=1": "new_users_1",
    "new users k=3": "new_users_3",
    "new users k=5": "new_users_5",
}


def protocol_weights(doc: dict[str, Any]) -> dict[str, float]:
    """Per service slice, the median over seeds of the weight each seed chose on its validation half (0 unless
    most seeds found a gain whose CI is above 0)."""
    chosen: dict[str, list[float]] = {}
    for seed in doc["per_seed"]:
        for name, detail in (seed.get("weights") or {}).items():
            chosen.setdefault(PROTOCOL_SLICES[name], []).append(float(detail["chosen"]))
    return {name: float(np.median(ws)) for name, ws in chosen.items()}


def apply_slice_weights(run: Path, weights: dict[str, float], out: Path | None = None) -> ItemsResult:
    """A new run version whose ``llm.json`` scoring carries ``weights`` per slice (the run's own weight stays the
    default of every other slice, warm users included)."""
    began = datetime.now(timezone.utc)
    art = load_artifacts(run)
    scoring = replace(art.llm.scoring, slice_weights={**(art.llm.scoring.slice_weights or {}), **weights})
    llm = replace(art.llm, scoring=scoring)
    return _new_version(art, run, out, "weights", read_item_changes(art.root), began, llm=llm)
