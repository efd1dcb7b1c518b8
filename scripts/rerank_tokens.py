"""Prompt tokens per re-rank vs validation NDCG@10: choosing K, recent items and preference length by measurement.

Rebuilds the re-rank job's validation and calibration lists from a run directory under several prompt
settings (one setting changed at a time from the run's), scores them with the run's re-rank adapter
(merged, as the service serves it), removes the label prior re-estimated for each setting (PriDe on the
calibration lists, as the job does) and prints, per setting: prompt tokens per request, the validation
NDCG@10 of the LLM order alone, of the fused order at the best weight of ``rerank.fusion_weights``, and of the
retriever. Validation users only (the test items are never read). The adapter was trained at the run's
setting; the other settings show what a prompt of that shape costs and what the same model does with it.

``--stand-in-chars``: rows for the service's cache-miss path, where a user has no generated preference yet
and the history-text stand-in (``llm.prompts.history_text`` of the user's training items, encoded by the
run's encoder) is both the retriever's preference and the prompt's, cut to each length tried (0: the
prompt says "(unknown)"; the retriever still reads the whole stand-in). These rows keep the label prior of
the run's setting, as the service does for a miss.

    python -m scripts.rerank_tokens runs/small3 --config small --out benchmarks/results/rerank_tokens.json
"""

from __future__ import annotations

from llm.engine import apply_env_defaults

apply_env_defaults()  # as `dpo4rec` sets them, before vLLM or the HF hub load

import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import typer  # noqa: E402

from llm.prompts import history_text, render  # noqa: E402
from llm.scoring import ScoringSpec, estimate_prior, fused_scores, item_logprobs, order, shifts  # noqa: E402
from llm.weights import merge_adapter  # noqa: E402
from rundir.items import prompt_items  # noqa: E402
from rundir.reader import load_llm_spec  # noqa: E402
from scripts.run_state import stage_inputs  # noqa: E402
from training import ranking_metrics as M  # noqa: E402
from training.engines import EngineJob, EngineWeights, engine_cfg, engine_jobs, run_isolated  # noqa: E402
from training.rerank_training import rerank_lists  # noqa: E402
from training.stages import prompt_config  # noqa: E402

app = typer.Typer(add_completion=False)
GENERATED, STAND_IN = "generated", "stand-in"  # the prompt's preference: the run's LLM text, or a miss's stand-in


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _per_user(ranks: list[int]) -> np.ndarray:
    return M.per_user(np.array(ranks), ks=(10,))["NDCG@10"]


def _ndcg10(ranks: list[int]) -> float:
    return float(_per_user(ranks).mean())


def _ranks(
    every: list,
    position: dict[str, int],
    llm_scores: list[np.ndarray],
    retriever_rank: dict[str, int],
    weight: float | None,
) -> list[int]:
    """Each validation user's rank of the true item; an unscored list keeps the retriever's rank."""
    out = []
    for e in every:
        if e.user_id not in position:
            out.append(retriever_rank[e.user_id])
            continue
        s = llm_scores[position[e.user_id]]
        fused = s if weight is None else fused_scores(np.asarray(e.retriever_scores), s, weight)
        out.append(int(np.flatnonzero(order(fused) == e.target_position)[0]))
    return out


@app.command()
def main(
    run: Path = typer.Argument(..., help="a run directory written by `dpo4rec train` with the re-rank job on"),
    config: str = typer.Option("small", help="the configuration the run was trained with"),
    ks: str = typer.Option("5,10,20", help="K values tried (recent and preference at the run's)"),
    recents: str = typer.Option("0,8", help="recent-item counts tried (K and preference at the run's)"),
    preference_chars: str = typer.Option("100", help="preference lengths tried (K and recent at the run's)"),
    stand_in_chars: str = typer.Option(
        "", help="cache-miss rows: stand-in lengths in the prompt, e.g. 300,150,0 (K and recent at the run's)"
    ),
    out: Path = typer.Option(Path("benchmarks/results/rerank_tokens.json"), help="JSON summary"),
) -> None:
    run_inp, served, tokenizer = stage_inputs(run, config)
    cfg, model_dir = run_inp.cfg, run_inp.model_dir
    rc = cfg.rerank
    rerank_adapter = load_llm_spec(run, []).adapters.get("rerank")
    if rerank_adapter is None:
        raise typer.BadParameter(f"{run} has no re-rank adapter")

    base = (rc.k, rc.recent_items, rc.preference_chars, GENERATED)
    settings = [base]
    settings += [(int(k), base[1], base[2], GENERATED) for k in _ints(ks) if k != base[0]]
    settings += [(base[0], r, base[2], GENERATED) for r in _ints(recents) if r != base[1]]
    settings += [(base[0], base[1], c, GENERATED) for c in _ints(preference_chars) if c != base[2]]
    settings += [(base[0], base[1], c, STAND_IN) for c in _ints(stand_in_chars)]
    depth = max(10, *(k for k, *_ in settings))  # the retriever's validation rank, to depth 10 at least

    # the cache-miss path: the stand-in is the retriever's preference (whole) and the prompt's (cut)
    missed = served
    if any(source == STAND_IN for *_, source in settings):
        items = {u: prompt_items(run_inp.catalog, run_inp.split.users[u].train) for u in run_inp.users}
        stand_in = {u: history_text(items[u], prompt_config(cfg)) for u in run_inp.users}
        vectors = run_inp.encoder.encode([stand_in[u] for u in run_inp.users], progress=True)
        missed = dataclasses.replace(served, texts=stand_in, vectors=vectors)

    def lists_for(k: int, recent: int, chars: int, source: str):  # type: ignore[no-untyped-def]
        """The job's lists, and the prompt settings, at one setting."""
        cut = max(chars, 16)  # a stand-in cut to 0 is sent as no text at all (the prompt says "(unknown)")
        c = dataclasses.replace(cfg, rerank=dataclasses.replace(rc, k=k, recent_items=recent, preference_chars=cut))
        out = served
        if source == STAND_IN:
            out = missed if chars else dataclasses.replace(missed, texts={u: "" for u in run_inp.users})
        lists = rerank_lists(dataclasses.replace(run_inp, cfg=c), tokenizer, out)
        return lists, prompt_config(c)

    # the retriever's validation rank of every user (the K-independent baseline), to `depth`, per source
    retriever_rank = {}
    for source in {s for *_, s in settings}:
        deep = lists_for(depth, base[1], base[2], source)[0].valid
        retriever_rank[source] = {
            e.user_id: (e.target_position if e.target_position is not None else depth) for e in deep
        }

    batches, plans = [], []  # per setting: its (prompts, label ids), and what to read back
    for k, recent, chars, source in settings:
        lists, pcfg = lists_for(k, recent, chars, source)
        valid = [e for e in lists.valid if e.target_position is not None]
        cal_shifts = shifts(k, min(rc.calibration_shifts or k, k))
        prompts, ids = [], []
        for e in lists.calibration:
            for s in cal_shifts:
                prompts.append(render(tokenizer, e.shifted_messages(s, pcfg)))
                ids.append([t for _, t in e.labels])
        n_cal = len(prompts)
        prompts += [render(tokenizer, e.messages) for e in valid]
        ids += [[t for _, t in e.labels] for e in valid]
        batches.append((prompts, ids))
        tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[n_cal:]]
        plans.append((k, recent, chars, source, lists.valid, valid, n_cal, len(cal_shifts), tokens))

    with tempfile.TemporaryDirectory() as tmp:
        merged = merge_adapter(model_dir, rerank_adapter, Path(tmp) / "merged", dtype="float32")
        started = time.perf_counter()
        jobs = [EngineJob.score(prompts, ids, EngineWeights(str(merged))) for prompts, ids in batches]
        scores = run_isolated(engine_jobs, engine_cfg(cfg), jobs)
        seconds = time.perf_counter() - started

    rows = []
    first: dict[str, dict[str, np.ndarray]] = {}  # per source, its first row's per-user NDCG@10
    priors: dict[int, tuple[float, ...]] = {}  # per K, the prior of the run's setting (a miss keeps it)
    for (k, recent, chars, source, every, valid, n_cal, n_shifts, tokens), raw in zip(plans, scores, strict=True):
        calibration = [raw[i : i + n_shifts] for i in range(0, n_cal, n_shifts)]
        prior = tuple(estimate_prior(calibration))
        if source == GENERATED and (recent, chars) == base[1:3]:
            priors[k] = prior
        spec = ScoringSpec(weight=None, log_prior=priors[k] if source == STAND_IN else prior, permutations=1)
        llm_scores = [item_logprobs([s], [0], spec) for s in raw[n_cal:]]
        position = {e.user_id: i for i, e in enumerate(valid)}

        args = (every, position, llm_scores, retriever_rank[source])
        curve = {w: _ndcg10(_ranks(*args, w)) for w in rc.fusion_weights}
        best = max(curve.values())
        row = {
            "k": k,
            "recent_items": recent,
            "preference_chars": chars,
            "preference": source,
            "prompt_tokens_mean": float(np.mean(tokens)) if tokens else None,
            "scored_lists": len(valid),
            "valid_users": len(every),
            "ndcg10_retriever": _ndcg10([retriever_rank[source][e.user_id] for e in every]),
            "ndcg10_llm_alone": _ndcg10(_ranks(*args, None)),
            "ndcg10_fused_best": best,
            "best_weight": min(w for w, v in curve.items() if v >= best - 1e-12),
            "fusion_curve": {str(w): round(v, 6) for w, v in curve.items()},
        }
        # paired over the validation users: each row against the first row of its source (the run's setting)
        per_user = {"llm_alone": _per_user(_ranks(*args, None))}
        per_user |= {f"fused_w{w:g}": _per_user(_ranks(*args, w)) for w in rc.fusion_weights}
        if source in first:
            row["vs_first_of_source"] = {
                name: M.bootstrap_diff(values, first[source][name]) for name, values in per_user.items()
            }
        else:
            first[source] = per_user
        rows.append(row)
        print(json.dumps(row))
    head = f"{'K':>3}{'recent':>7}{'chars':>6}{'text':>10}{'tokens':>8}{'lists':>6}{'retriever':>10}{'LLM alone':>10}"
    print(f"\n{head}", end="")
    print(f"{'fused':>8}{'w':>5}")
    for r in rows:
        print(
            f"{r['k']:>3}{r['recent_items']:>7}{r['preference_chars']:>6}{r['preference']:>10}{r['prompt_tokens_mean']:>8.0f}"
            f"{r['scored_lists']:>6}{r['ndcg10_retriever']:>10.4f}{r['ndcg10_llm_alone']:>10.4f}"
            f"{r['ndcg10_fused_best']:>8.4f}{r['best_weight']:>5g}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "run": str(run),
        "config": config,
        "engine_seconds": seconds,
        "rows": rows,
    }
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: {out} (engine {seconds:.0f} s)")


if __name__ == "__main__":
    app()
