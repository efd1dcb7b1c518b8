"""``dpo4rec items add|remove`` on a run root: a new version with new items retrievable, items taken out of
retrieval, ``rollback``, and every bad input refused with file and line, the root untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dpo4rec.items import ItemsFileError, add_items, remove_items
from retrieval.content import text_vectors
from retrieval.encoder import TextEncoder
from rundir.manifest import RunDirError, verify
from rundir.reader import load_artifacts
from rundir.versions import current_version, init_root, is_root, rollback, versions
from tests.service.support import N_ITEMS, VERSION, base_settings, build_run_dir

NEW = [
    {"id": "n1", "title": "Golden River Nights (2031)", "genres": ["Drama", "Romance"], "year": 2031},
    {"id": "n2", "title": "Iron Ghost Summer", "genres": "Action|Sci-Fi", "year": 2030},
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    run = build_run_dir(tmp_path / VERSION, llm_dir=tmp_path)
    init_root(tmp_path / "root", run)
    return tmp_path / "root"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_items_add_writes_a_version_whose_index_holds_the_new_items_by_content(root, tmp_path):
    result = add_items(root, write_jsonl(tmp_path / "new.jsonl", NEW))
    assert current_version(root) == result.version != VERSION and versions(root) == [VERSION, result.version]
    verify(root / VERSION)  # the old version is untouched (checksums)
    art = load_artifacts(root)
    assert art.version == result.version and art.manifest["parent_version"] == VERSION
    assert len(art.catalog) == art.retriever.cfg.num_items == art.index.num_items == N_ITEMS + 2
    assert art.catalog[N_ITEMS + 2].genres == ("Action", "Sci-Fi")
    # the stored vectors are the content tower's, the trained ones unchanged
    old = load_artifacts(root / VERSION)
    stored = art.retriever.item_vectors()
    expected = text_vectors(
        art.content, TextEncoder(art.encoder_config), [art.catalog[N_ITEMS + 1], art.catalog[N_ITEMS + 2]]
    )
    np.testing.assert_allclose(stored[N_ITEMS + 1 :], expected, atol=1e-5)
    np.testing.assert_array_equal(stored[: N_ITEMS + 1], old.retriever.item_vectors())
    assert rollback(root) == VERSION and load_artifacts(root).version == VERSION


def test_a_new_item_is_retrieved_in_the_next_answer_and_a_removed_one_never(root, tmp_path):
    add_items(root, write_jsonl(tmp_path / "new.jsonl", NEW))
    app_settings = base_settings(root, llm_enabled=False)
    from service.main import create_app

    everything = {"user_id": "u1", "top_n": N_ITEMS + 2}
    with TestClient(create_app(app_settings)) as client:
        answer = client.post("/rerank", json=everything).json()
    ids = [r["item_id"] for r in answer["results"]]
    assert {"n1", "n2"} <= set(ids) and answer["model_version"] == current_version(root)
    scores = [r["relevance_score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1  # the retriever's scores, not ranks
    removed = remove_items(root, ["n1", ids[-1]])
    assert load_artifacts(root).retired and removed.removed == ["n1", ids[-1]]
    with TestClient(create_app(base_settings(root, llm_enabled=False))) as client:
        after = [r["item_id"] for r in client.post("/rerank", json=everything).json()["results"]]
    assert "n1" not in after and ids[-1] not in after and "n2" in after


BAD = {
    "duplicate id": ([NEW[0], NEW[0]], ":2: duplicate id n1 (first on line 1)"),
    "id in the catalog": ([{"id": "101", "title": "Again"}], ":1: id 101 is already in the catalog"),
    "missing title": ([NEW[0], {"id": "n3", "genres": ["Drama"]}], ":2: item n3: missing title"),
    "unknown field": ([{**NEW[0], "director": "X"}], ":1: unknown field director (known: id, title, genres, year)"),
    "bad year": ([{**NEW[0], "year": "soon"}], ":1: item n1: year 'soon' is not a whole number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_items_name_file_and_line_and_leave_the_root_untouched(root, tmp_path, case):
    rows, message = BAD[case]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(ItemsFileError) as err:
        add_items(root, path)
    assert str(err.value) == f"{path}{message}"
    assert sorted(p.name for p in root.iterdir()) == before and current_version(root) == VERSION


def test_malformed_lines_and_csv(root, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(NEW[0]) + "\n{not json\n")
    with pytest.raises(ItemsFileError, match=r"broken.jsonl:2: not valid JSON"):
        add_items(root, broken)
    csv_path = tmp_path / "new.csv"
    csv_path.write_text("id,title,genres,year\nc1,Night Star (2032),Drama|Comedy,2032\nc2,Wild Lost,Horror,\n")
    assert add_items(root, csv_path).added == ["c1", "c2"]
    csv_path.write_text("id,title\nc3,A,extra\n")
    with pytest.raises(ItemsFileError, match=r"new.csv:2: more values than the header has columns"):
        add_items(root, csv_path)


def test_a_single_run_directory_needs_out(tmp_path):
    run = build_run_dir(tmp_path / "run", llm_dir=tmp_path)
    path = write_jsonl(tmp_path / "new.jsonl", NEW)
    with pytest.raises(RunDirError, match="single run directory: give --out"):
        add_items(run, path)
    result = add_items(run, path, out=tmp_path / "run-2")
    assert not is_root(run) and result.run_dir == tmp_path / "run-2" and len(load_artifacts(run).catalog) == N_ITEMS
    assert len(load_artifacts(tmp_path / "run-2").catalog) == N_ITEMS + 2


def test_the_protocols_slice_weights_go_into_a_new_version(root):
    from dpo4rec.items import apply_slice_weights, protocol_weights

    doc = {
        "per_seed": [
            {"weights": {"new-items shelf": {"chosen": 0.5}, "new users k=1": {"chosen": 0.0}}},
            {"weights": {"new-items shelf": {"chosen": 0.5}, "new users k=1": {"chosen": 1.0}}},
            {"weights": {"new-items shelf": {"chosen": 0.0}, "new users k=1": {"chosen": 0.0}}},
        ]
    }
    weights = protocol_weights(doc)
    assert weights == {"new_items_shelf": 0.5, "new_users_1": 0.0}  # the median over seeds
    result = apply_slice_weights(root, weights)
    scoring = load_artifacts(root).llm.scoring
    assert current_version(root) == result.version and scoring.slice_weights == weights
    assert (
        scoring.for_slice("new_items_shelf").weight == 0.5
        and load_artifacts(root / VERSION).llm.scoring.slice_weights is None
    )
