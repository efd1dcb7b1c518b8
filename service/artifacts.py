"""Load a run directory (docs/ARCHITECTURE.md, "Run directory") into the objects the service serves.

The directory is verified first (``retrieval.rundir.verify``: manifest present, every required file
listed and unchanged); then its parts are checked against each other (catalog size vs retriever vs
index, vector dimensions, history indices), so a partial or mismatched run is refused at start with
one message saying what is wrong, never discovered by a request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm.engine import GenerationConfig
from llm.prompts import PromptConfig
from llm.scoring import ScoringSpec
from retrieval.catalog import Catalog
from retrieval.encoder import EncoderConfig
from retrieval.index import ItemIndex
from retrieval.rundir import RunDirError, verify
from retrieval.sasrec import SASRec

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
DEFAULT_RERANK_K = 20


@dataclass(frozen=True)
class LLMSpec:
    """``llm.json``: which model, which adapters, and the prompt/generation settings training used."""

    base_model: str  # "smollm2-135m-instruct" or a model folder (absolute, or resolved against the run)
    adapters: dict[str, Path | None]  # job ("preference" | "rerank") -> adapter folder
    prompt: PromptConfig
    rerank_k: int
    preference_generation: GenerationConfig
    scoring: ScoringSpec = ScoringSpec()  # "scoring": prior, fusion weight, orders; absent (older runs): LLM only


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

    def preference_of(self, user_id: str) -> tuple[str, np.ndarray] | None:
        row = self.preference_rows.get(user_id)
        if row is None:
            return None
        return self.preference_texts[user_id], self.preference_vectors[row]


def _json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{root / name} is not valid JSON: {e}") from None


def _known_fields(cls: type, raw: dict[str, Any], where: str, ignored: list[str]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        ignored.extend(f"{where}.{k}" for k in unknown)
        log.warning("llm.json: ignoring unknown %s fields %s", where, unknown)
    return {k: v for k, v in raw.items() if k in names}


def load_llm_spec(root: Path, ignored: list[str]) -> LLMSpec:
    raw = _json(root, "llm.json")
    if not isinstance(raw, dict) or not raw.get("base_model"):
        raise RunDirError(f"{root / 'llm.json'} needs a base_model (a model name or folder)")
    base = str(raw["base_model"])
    if not Path(base).is_absolute() and (root / base).is_dir():
        base = str((root / base).resolve())
    adapters: dict[str, Path | None] = {}
    for job in ("preference", "rerank"):
        rel = (raw.get("adapters") or {}).get(job)
        if rel is not None:
            path = (root / rel).resolve()
            if not path.is_dir():
                raise RunDirError(f"{root / 'llm.json'}: adapters.{job} folder {rel!r} is missing in the run")
            adapters[job] = path
        else:
            adapters[job] = None
    try:
        saved = {"natural_titles": False, **(raw.get("prompt") or {})}  # older runs: catalogue-order titles
        prompt = PromptConfig(**_known_fields(PromptConfig, saved, "prompt", ignored))
        gen = GenerationConfig(
            **_known_fields(GenerationConfig, raw.get("preference_generation") or {}, "preference_generation", ignored)
        )
        scoring = ScoringSpec(**_known_fields(ScoringSpec, raw.get("scoring") or {}, "scoring", ignored))
    except (TypeError, ValueError) as e:
        raise RunDirError(f"{root / 'llm.json'}: {e}") from None
    rerank_k = int(raw.get("rerank_k") or DEFAULT_RERANK_K)
    if scoring.log_prior is not None and len(scoring.log_prior) < rerank_k:
        raise RunDirError(
            f"{root / 'llm.json'}: scoring.log_prior has {len(scoring.log_prior)} labels, rerank_k is {rerank_k}"
        )
    return LLMSpec(
        base_model=base,
        adapters=adapters,
        prompt=prompt,
        rerank_k=rerank_k,
        preference_generation=gen,
        scoring=scoring,
    )


def _load_preferences(root: Path) -> tuple[dict[str, str], dict[str, int], np.ndarray]:
    texts: dict[str, str] = {}
    rows: dict[str, int] = {}
    with open(root / "preferences.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                user, text = str(row["user_id"]), str(row["text"])
            except (json.JSONDecodeError, KeyError) as e:
                raise RunDirError(f"{root / 'preferences.jsonl'} line {n + 1}: {e}") from None
            rows[user] = len(texts) if user not in texts else rows[user]
            texts[user] = text
    vectors = np.load(root / "preference_vectors.npy").astype(np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(rows):
        raise RunDirError(
            f"{root}: preference_vectors.npy has shape {vectors.shape}, expected ({len(rows)}, D) "
            "(one row per line of preferences.jsonl)"
        )
    return texts, rows, vectors


def load_artifacts(root: Path, checksums: bool = True) -> Artifacts:
    """Verify and load a run directory; raises :class:`RunDirError` naming the problem."""
    root = Path(root)
    manifest = verify(root, required=REQUIRED_FILES, checksums=checksums)
    version = str(manifest.get("version") or "")
    if not version:
        raise RunDirError(f"{root / 'manifest.json'} has no version (Redis keys and responses need it)")
    catalog = Catalog.load(root / "catalog.jsonl")
    try:
        retriever = SASRec.load(root / "retriever")
        index = ItemIndex.load(root / "index.faiss")
        encoder_config = EncoderConfig(**_json(root, "encoder.json"))
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
    texts, rows, vectors = _load_preferences(root)
    if retriever.cfg.pref_dim and vectors.shape[1] != retriever.cfg.pref_dim:
        raise RunDirError(
            f"{root}: preference vectors are {vectors.shape[1]}-d but the retriever fuses {retriever.cfg.pref_dim}-d"
        )
    users_raw = _json(root, "users.json")
    users = {str(u): [int(i) for i in items] for u, items in users_raw.items()}
    bad = [u for u, items in users.items() if any(not 1 <= i <= n for i in items)]
    if bad:
        raise RunDirError(f"{root / 'users.json'}: item indices outside 1..{n} for users {bad[:5]}")
    ignored: list[str] = []
    llm = load_llm_spec(root, ignored)
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
    )
