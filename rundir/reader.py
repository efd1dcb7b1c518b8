"""Read a run directory (docs/ARCHITECTURE.md, "Run directory") into the objects the service serves.

The directory is verified first (``rundir.manifest.verify``: manifest present, every required file
listed and unchanged); then its parts are checked against each other (catalog size vs retriever vs
index, vector dimensions, history indices), so a partial or mismatched run is refused at start with
one message saying what is wrong, never discovered by a request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.catalog import Catalog
from retrieval.content import CONTENT_FILE, ContentTower
from retrieval.encoder import EncoderConfig
from retrieval.index import ItemIndex
from retrieval.sasrec import SASRec
from rundir.manifest import RunDirError, read_manifest, verify
from rundir.preferences import load_preferences
from rundir.spec import LLMSpec, load_llm_spec, read_json
from rundir.versions import resolve

ITEMS_FILE = "items.json"  # {"added": [ids], "removed": [ids]}: what ``dpo4rec items`` changed since training

log = logging.getLogger(__name__)

REQUIRED_FILES = (
    "catalog.jsonl",
    "retriever/model.pt",
    "retriever/config.json",
    "encoder.json",
    "index.faiss",
    "preferences.jsonl",
    "preference_vectors.npy",
    "users.json",
    "llm.json",
)


@dataclass
class Artifacts:
    root: Path
    version: str
    manifest: dict[str, Any]
    catalog: Catalog
    retriever: SASRec
    encoder_config: EncoderConfig
    index: ItemIndex
    preference_texts: dict[str, str]  # user -> text, from preferences.jsonl
    preference_rows: dict[str, int]  # user -> row of preference_vectors
    preference_vectors: np.ndarray  # (n_users, D) float32
    users: dict[str, list[int]]  # user -> served history (catalog indices, time order)
    llm: LLMSpec
    ignored: list[str] = field(default_factory=list)  # llm.json keys this code does not know
    content: ContentTower | None = None  # item text -> item vector (content_tower.npz); None in older runs
    retired: frozenset[int] = frozenset()  # items taken out of retrieval (``dpo4rec items remove``)
    trained_items: int = 0  # the first this many catalog items were in training; the rest came by ``items add``

    def preference_of(self, user_id: str) -> tuple[str, np.ndarray] | None:
        row = self.preference_rows.get(user_id)
        if row is None:
            return None
        return self.preference_texts[user_id], self.preference_vectors[row]


def load_artifacts(root: Path, checksums: bool = True) -> Artifacts:
    """Verify and load a run directory (or a run root's ``current`` version); raises :class:`RunDirError`
    naming the problem."""
    root = resolve(Path(root)).resolve()  # the real folder: a symlink such as /runs/current may move later
    manifest = verify(root, required=REQUIRED_FILES, checksums=checksums)
    version = str(manifest.get("version") or "")
    if not version:
        raise RunDirError(f"{root / 'manifest.json'} has no version (Redis keys and responses need it)")
    catalog = Catalog.load(root / "catalog.jsonl")
    try:
        retriever = SASRec.load(root / "retriever")
        index = ItemIndex.load(root / "index.faiss")
        encoder_config = EncoderConfig(**read_json(root, "encoder.json"))
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise RunDirError(f"{root}: {e}") from None
    n = len(catalog)
    if retriever.cfg.num_items != n or index.num_items != n:
        raise RunDirError(
            f"{root}: catalog has {n} items but the retriever has {retriever.cfg.num_items} and the index "
            f"{index.num_items}: the files come from different runs"
        )
    if index.dim != retriever.cfg.hidden:
        raise RunDirError(f"{root}: index dim {index.dim} != retriever hidden {retriever.cfg.hidden}")
    texts, vectors = load_preferences(root)
    rows = {user: i for i, user in enumerate(texts)}
    if retriever.cfg.pref_dim and vectors.shape[1] != retriever.cfg.pref_dim:
        raise RunDirError(
            f"{root}: preference vectors are {vectors.shape[1]}-d but the retriever fuses {retriever.cfg.pref_dim}-d"
        )
    users_raw = read_json(root, "users.json")
    users = {str(u): [int(i) for i in items] for u, items in users_raw.items()}
    bad = [u for u, items in users.items() if any(not 1 <= i <= n for i in items)]
    if bad:
        raise RunDirError(f"{root / 'users.json'}: item indices outside 1..{n} for users {bad[:5]}")
    ignored: list[str] = []
    llm = load_llm_spec(root, ignored)
    content = read_content_tower(root, retriever.cfg.hidden)
    changes = read_item_changes(root)
    retired = frozenset(catalog.indices_of(changes["removed"]))
    log.info("loaded run %s (version %s): %d items, %d users, %d preferences", root, version, n, len(users), len(rows))
    return Artifacts(
        root=root,
        version=version,
        manifest=manifest,
        catalog=catalog,
        retriever=retriever,
        encoder_config=encoder_config,
        index=index,
        preference_texts=texts,
        preference_rows=rows,
        preference_vectors=vectors,
        users=users,
        llm=llm,
        ignored=ignored,
        content=content,
        retired=retired,
        trained_items=n - len(changes["added"]),
    )


def read_content_tower(root: Path, hidden: int) -> ContentTower | None:
    """The run's content tower, or None when the run has none (written before it existed)."""
    path = Path(root) / CONTENT_FILE
    if not path.is_file():
        return None
    try:
        tower = ContentTower.load(path)
    except (OSError, KeyError, ValueError) as e:
        raise RunDirError(f"{path}: not a content tower ({e})") from None
    if tower.weight.shape[1] != hidden:
        raise RunDirError(f"{path} maps into {tower.weight.shape[1]}-d, the retriever's item vectors are {hidden}-d")
    return tower


def read_item_changes(root: Path) -> dict[str, list[str]]:
    """``items.json``: the item ids added and removed since training (empty lists when the file is absent)."""
    if not (Path(root) / ITEMS_FILE).is_file():
        return {"added": [], "removed": []}
    raw = read_json(Path(root), ITEMS_FILE)
    return {key: [str(i) for i in raw.get(key) or []] for key in ("added", "removed")}


def read_users(root: Path) -> dict[str, list[int]]:
    """``users.json``: user -> served history (catalog indices, time order)."""
    return {str(u): [int(i) for i in items] for u, items in read_json(resolve(Path(root)), "users.json").items()}


def read_catalog(root: Path) -> Catalog:
    return Catalog.load(resolve(Path(root)) / "catalog.jsonl")


def read_retriever(root: Path) -> SASRec:
    return SASRec.load(resolve(Path(root)) / "retriever")


def read_encoder_config(root: Path) -> EncoderConfig:
    return EncoderConfig(**read_json(resolve(Path(root)), "encoder.json"))


def read_version(root: Path) -> str:
    """The run's model version (``manifest.json``); a ``RunDirError`` when ``root`` is not a run."""
    return str(read_manifest(resolve(Path(root))).get("version") or "")


def read_dpo_pairs(root: Path, round_: int) -> list[dict[str, Any]]:
    """The DPO pairs of preference round ``round_`` (``dpo/preference_round{r}_pairs.jsonl``)."""
    path = Path(root) / "dpo" / f"preference_round{round_}_pairs.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
