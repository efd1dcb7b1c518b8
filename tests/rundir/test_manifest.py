"""Run directories: atomic staging, manifest checksums, refusal of partial or changed runs."""

import json

import pytest

from retrieval.catalog import Catalog, Item, UnknownItemError
from rundir.manifest import RunDirError, staging_dir, verify, write_manifest


def test_complete_run_verifies_and_partial_or_changed_is_refused(tmp_path):
    run = tmp_path / "run"
    with staging_dir(run) as tmp:
        (tmp / "a.txt").write_text("hello")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        write_manifest(tmp, version="v1", dataset="toy", config={"k": 1})
    manifest = verify(run, required=("a.txt", "sub/b.bin"))
    assert manifest["version"] == "v1" and set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    (run / "a.txt").write_text("tampered")
    with pytest.raises(RunDirError, match="differ from the manifest checksums: a.txt"):
        verify(run)
    (run / "sub" / "b.bin").unlink()
    with pytest.raises(RunDirError, match="partial: missing sub/b.bin"):
        verify(run, checksums=False)
    (run / "manifest.json").unlink()
    with pytest.raises(RunDirError, match="no manifest.json"):
        verify(run)


def test_failed_staging_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ZeroDivisionError), staging_dir(run) as tmp:
        (tmp / "x").write_text("1")
        raise ZeroDivisionError
    assert not run.exists() and list(tmp_path.iterdir()) == []
    run.mkdir()
    with pytest.raises(RunDirError, match="already exists"), staging_dir(run):
        pass


def test_format_version_checked(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(RunDirError, match="format_version 99"):
        verify(tmp_path)


def test_catalog_round_trip_and_unknown_ids(tmp_path):
    cat = Catalog([Item("a", "Alpha", ("x",), 1999), Item("b", "Beta")])
    cat.save(tmp_path / "c.jsonl")
    back = Catalog.load(tmp_path / "c.jsonl")
    assert back[1] == cat[1] and back.index_of("b") == 2 and back.num_embeddings == 3
    with pytest.raises(UnknownItemError) as err:
        back.indices_of(["a", "q", "r"])
    assert err.value.item_ids == ["q", "r"]
