"""A trained run's served state as the re-rank stage saw it, rebuilt for the diagnostics in ``scripts/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from transformers import AutoTokenizer

from llm.models import resolve_model
from retrieval.encoder import TextEncoder
from rundir.preferences import load_preferences
from rundir.reader import read_encoder_config, read_retriever
from training.config import load_config
from training.data import prepare_data
from training.stages import BASE_ROW, Served, StageInputs


def stage_inputs(run: Path, config: str) -> tuple[StageInputs, Served, Any]:
    """The stage inputs (the run's served texts, vectors and retriever on the config's users), what the run
    serves, and the tokenizer; a run trained on other users is refused."""
    cfg = load_config(config)
    data = prepare_data(cfg)
    users = data.users
    texts, vectors = load_preferences(run)  # the served texts, rows in the run's user order
    if list(texts) != users:
        raise typer.BadParameter(f"{run} was not trained on the users of --config {config}")
    retriever = read_retriever(run)
    model_dir = resolve_model(cfg.llm.model, Path(cfg.llm.model_cache).expanduser())
    ranks = np.zeros(len(users), dtype=np.int64)  # the re-rank lists do not read test ranks
    inp = StageInputs(
        cfg=cfg,
        catalog=data.dataset.catalog,
        split=data.split,
        users=users,
        model_dir=model_dir,
        encoder=TextEncoder(read_encoder_config(run)),
        texts=texts,
        vectors=vectors,
        retriever=retriever,
        ranks=ranks,
    )
    return inp, Served(BASE_ROW, texts, vectors, retriever, ranks), AutoTokenizer.from_pretrained(model_dir)
