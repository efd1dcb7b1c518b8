"""Write a whole run directory from the parts training made: the one writer (read back by ``rundir.reader``).

The run is staged in a temporary sibling folder and renamed into place only when every file and the
manifest are written (``rundir.manifest.staging_dir``), so a reader never sees half a run. Adapter folders
and other files are copied from where training left them; ``llm.json`` is written from the ``LLMSpec``
the service reads it back into.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.catalog import Catalog
from retrieval.content import CONTENT_FILE, ContentTower
from retrieval.encoder import EncoderConfig
from retrieval.index import ItemIndex
from retrieval.sasrec import SASRec
from rundir.manifest import MANIFEST, read_manifest, staging_dir, write_manifest
from rundir.preferences import save_preferences
from rundir.reader import ITEMS_FILE, Artifacts
from rundir.spec import LLMSpec, write_llm_spec

RUN_KEYS = {"format_version", "version", "dataset", "config", "files", "metrics"}  # write_manifest's own


@dataclass
class RunContents:
    """Everything a run directory holds."""

    catalog: Catalog
    retriever: SASRec  # the served retriever
    encoder: EncoderConfig
    index: ItemIndex  # over ``retriever``'s item vectors
    texts: dict[str, str]  # served preference per user, in the run's user order
    vectors: np.ndarray  # (U, D) their vectors, rows in that order
    users: dict[str, list[int]]  # user -> served history (catalog indices, time order)
    llm: LLMSpec  # adapters: the folders training wrote (copied to adapters/<job>)
    metrics: dict[str, Any]  # metrics.json
    files: dict[str, Path] = field(default_factory=dict)  # run-relative name -> a file to copy (DPO pairs)
    content: ContentTower | None = None  # item text -> item vector, for items added after training


def write_run(
    out: Path,
    contents: RunContents,
    *,
    version: str,
    dataset: str,
    config: dict[str, Any],
    headline: dict[str, Any],
    extra: dict[str, Any] | None = None,
    report: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out`` whole (``report`` adds its files, e.g. plots, before the manifest checksums them)."""
    with staging_dir(Path(out), overwrite=overwrite) as tmp:
        contents.catalog.save(tmp / "catalog.jsonl")
        contents.retriever.save(tmp / "retriever")
        (tmp / "encoder.json").write_text(json.dumps(asdict(contents.encoder)))
        contents.index.save(tmp / "index.faiss")
        save_preferences(tmp, contents.texts, contents.vectors)
        (tmp / "users.json").write_text(json.dumps(contents.users))
        adapters: dict[str, Path | None] = {}
        for job, folder in contents.llm.adapters.items():
            adapters[job] = None if folder is None else shutil.copytree(folder, tmp / "adapters" / job)
        write_llm_spec(tmp, replace(contents.llm, adapters=adapters))
        for name, source in contents.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        if contents.content is not None:
            contents.content.save(tmp / CONTENT_FILE)
        (tmp / "metrics.json").write_text(json.dumps(contents.metrics, indent=2))
        if report is not None:
            report(tmp)
        write_manifest(tmp, version=version, dataset=dataset, config=config, metrics=headline, extra=extra)
    return Path(out)


def derive_run(
    source: Artifacts,
    out: Path,
    *,
    version: str,
    changes: dict[str, list[str]],
    catalog: Catalog | None = None,
    retriever: SASRec | None = None,
    content: ContentTower | None = None,
    llm: LLMSpec | None = None,
) -> Path:
    """A new run directory ``out`` (staged, then renamed): a copy of ``source`` with the catalog, the retriever
    (and the FAISS index over its item vectors, of the same kind), the content tower and ``llm.json`` replaced
    where given,
    ``items.json`` set to ``changes``, and a manifest naming ``version`` and its parent."""
    with staging_dir(Path(out)) as tmp:
        shutil.copytree(source.root, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        if catalog is not None:
            catalog.save(tmp / "catalog.jsonl")
        if retriever is not None:
            shutil.rmtree(tmp / "retriever")
            retriever.save(tmp / "retriever")
            ItemIndex(retriever.item_vectors(), kind=source.index.kind).save(tmp / "index.faiss")  # type: ignore[arg-type]
        if content is not None:
            content.save(tmp / CONTENT_FILE)
        if llm is not None:  # adapter folders were copied with the run: name them inside the new one
            moved = {job: a and tmp / Path(a).relative_to(source.root) for job, a in llm.adapters.items()}
            write_llm_spec(tmp, replace(llm, adapters=moved))
        (tmp / ITEMS_FILE).write_text(json.dumps(changes, indent=2))
        old = read_manifest(source.root)
        extra = {k: v for k, v in old.items() if k not in RUN_KEYS}
        extra.update(
            parent_version=source.version, items_added=len(changes["added"]), items_removed=len(changes["removed"])
        )
        write_manifest(
            tmp, version=version, dataset=old["dataset"], config=old["config"], metrics=old.get("metrics"), extra=extra
        )
    return Path(out)
