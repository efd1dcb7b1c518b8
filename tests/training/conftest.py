"""Fixtures of the training tests: MovieLens-100K, and ONE tiny end-to-end run (the full loop) that
test_pipeline and test_loop both read, so the suite pays for its engine starts and TRL runs once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tiny import tiny_loop_config, write_tiny_dataset  # same directory

from training.config import PipelineConfig, from_dict
from training.data import load_dataset
from training.pipeline import run_pipeline


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory):
    """MovieLens-100K read from the RecBole wheel (cached in ./data across runs)."""
    return load_dataset("ml-100k", Path("data"))


@dataclass(frozen=True)
class TinyRun:
    cfg: PipelineConfig
    out: Path  # the run directory
    doc: dict[str, Any]  # metrics.json


@pytest.fixture(scope="session")
def tiny_loop_run(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> TinyRun:
    """The whole chain on tiny data with the tiny random LLM through the real vLLM engine: base
    preferences, SASRec with and without them, one DPO round, the re-rank job (zero-shot, SFT, DPO)."""
    tmp = tmp_path_factory.mktemp("tiny-loop")
    data = write_tiny_dataset(tmp / "tiny")
    cfg = from_dict(tiny_loop_config(data, tmp / "cache", tiny_llm_dir))
    doc = run_pipeline(cfg, tmp / "run")
    return TinyRun(cfg=cfg, out=tmp / "run", doc=doc)
