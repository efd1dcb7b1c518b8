"""The retrieval-path benchmark's own parts (``benchmarks/retrieval_path.py``): the bare component driven open-loop
on a real tiny run (SASRec + FAISS, no fakes), and the batch-size reading of a real /metrics page. Nothing here
is about speed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from benchmarks.open_loop import LoadConfig, measure_level
from benchmarks.retrieval_path import Bare, batch_stats
from service.telemetry import ServiceMetrics
from tests.service.support import build_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("runs") / "tiny", tiny_llm_dir)


def test_the_bare_component_answers_every_arrival_with_unseen_items(run_dir: Path) -> None:
    bare = Bare(run_dir, k=10, torch_threads=1)
    bodies = list(bare.users)
    cfg = LoadConfig(url="", duration_s=1.0, slo_ms=50.0)
    level, shots = asyncio.run(measure_level(bare, 40.0, bodies, cfg, seed=0))  # type: ignore[arg-type]
    assert level["sent"] == 40 and all(s.status == 200 for s in shots)
    assert bare.coalescer.calls == 40 and 1 <= bare.coalescer.batches <= 40
    for user, (history, vector, banned) in list(bare.users.items())[:5]:
        alone = bare.search_many([(history, vector, banned)])[0]
        together = bare.search_many([bare.users[b] for b in bodies[:7]] + [(history, vector, banned)])[-1]
        assert np.array_equal(alone, together), f"{user!r}: a batch changed the answer"
        assert len(alone) == 10 and not set(alone.tolist()) & banned, "a seen item was retrieved"


def test_batch_stats_reads_the_services_histogram() -> None:
    metrics = ServiceMetrics()
    for size in (1, 3, 8):
        metrics.retriever_batch_size.observe(size)
    assert batch_stats(metrics.render().decode()) == (12.0, 3.0)
    assert batch_stats("# nothing here\n") == (0.0, 0.0)
