"""Does a run's re-ranker follow the retriever's order, or find the true item? And what did it train on?

Rebuilds the re-rank job's lists from a run directory (its served retriever, preference texts and K),
prints where the true label sits in the training lists and where the DPO rejected labels fall (both
should be spread over A..K), then scores the test lists with the base LLM (zero-shot) and with the run's
re-rank adapter (SFT+DPO; the SFT-only adapter is not kept in a run), raw, and prints
``training.rerank.order_stats`` for both.

    python -m scripts.rerank_order runs/small2 --config small   # from the repo root
"""

from __future__ import annotations

from llm.engine import apply_env_defaults

apply_env_defaults()  # as `dpo4rec` sets them, before vLLM or the HF hub load

import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import typer  # noqa: E402

from llm.prompts import render  # noqa: E402
from rundir.reader import load_llm_spec  # noqa: E402
from scripts.run_state import stage_inputs  # noqa: E402
from training.engines import EngineJob, EngineWeights, engine_cfg, engine_jobs, run_isolated  # noqa: E402
from training.rerank import dpo_rows, order_stats  # noqa: E402
from training.rerank_training import rerank_lists  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(
    run: Path = typer.Argument(..., help="a run directory written by `dpo4rec train` with the re-rank job on"),
    config: str = typer.Option("small", help="the configuration the run was trained with"),
) -> None:
    from llm.weights import merge_adapter

    inp, out, tokenizer = stage_inputs(run, config)
    cfg, model_dir = inp.cfg, inp.model_dir
    lists = rerank_lists(inp, tokenizer, out)
    k = cfg.rerank.k
    share = np.bincount([e.target_position for e in lists.train], minlength=k) / max(len(lists.train), 1)
    rows = dpo_rows(lists.train, cfg.rerank.dpo_rejected, cfg.rerank.seed)
    letters = [e[0] for e in lists.train[0].labels] if lists.train else []
    rejected = np.bincount([letters.index(r["rejected"]) for r in rows], minlength=k) / max(len(rows), 1)
    print(f"training: {len(lists.train)} lists; true label share by position {np.round(share, 3).tolist()}")
    print(f"training: {len(rows)} DPO pairs; rejected label share by position {np.round(rejected, 3).tolist()}")
    # test prompts: only users whose test item is among the K can move
    scored = [e for e in lists.test if e.target_position is not None]
    prompts = [render(tokenizer, e.messages) for e in scored]
    ids = [[token for _, token in e.labels] for e in scored]
    rerank_adapter = load_llm_spec(run, []).adapters.get("rerank")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [EngineJob.score(prompts, ids, EngineWeights(str(model_dir)))]
        if rerank_adapter is not None:
            merged = merge_adapter(model_dir, rerank_adapter, Path(tmp) / "merged", dtype="float32")
            jobs.append(EngineJob.score(prompts, ids, EngineWeights(str(merged))))
        scores = run_isolated(engine_jobs, engine_cfg(cfg), jobs)
    targets = [e.target_position for e in scored]
    for name, per_prompt in zip(("zero-shot", "the run's re-rank adapter (SFT+DPO)"), scores, strict=False):
        print(f"test, {name}: {json.dumps({k: round(v, 4) for k, v in order_stats(per_prompt, targets).items()})}")


if __name__ == "__main__":
    app()
