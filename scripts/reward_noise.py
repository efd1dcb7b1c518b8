"""How much of a DPO pair's order is the text, and how much the reward model's training seed?

Reads a loop run's round-1 pairs (``dpo/preference_round1_pairs.jsonl``: chosen and rejected text, and
their rewards under the run's reward model), retrains the knowledge-augmented SASRec of the run's
configuration with other seeds on the run's served preference texts, re-scores every pair, and prints
how often each retrained model orders the pair the same way (chosen above rejected), with a 95 %
Wilson interval. About 50 % means the pairs' order is mostly reward-model noise, and DPO is fitting it.
Each retrained model's best validation NDCG@10 shows the seed-to-seed spread of the retriever itself.

    python -m scripts.reward_noise runs/small2 --config small --seeds 1 --seeds 2   # from the repo root
"""

from __future__ import annotations

from llm.engine import apply_env_defaults

apply_env_defaults()  # as `dpo4rec` sets them, before vLLM or the HF hub load

import math  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import typer  # noqa: E402

from retrieval.encoder import EncoderConfig, TextEncoder  # noqa: E402
from rundir.preferences import load_preferences  # noqa: E402
from rundir.reader import read_dpo_pairs  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.reward import reward_inputs, rewards  # noqa: E402
from training.stages import train_sasrec  # noqa: E402

app = typer.Typer(add_completion=False)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


@app.command()
def main(
    run: Path = typer.Argument(..., help="a run directory written by `dpo4rec train` with the DPO loop on"),
    config: str = typer.Option("small", help="the configuration the run was trained with"),
    seeds: list[int] = typer.Option([1, 2], help="retriever seeds of the retrained reward models"),
    round_: int = typer.Option(1, "--round", help="whose pairs"),
) -> None:
    cfg = load_config(config)
    pairs = read_dpo_pairs(run, round_)
    data = prepare_data(cfg)
    split, users = data.split, data.users
    texts, vectors = load_preferences(run)
    prefs = {u: vectors[i] for i, u in enumerate(texts)}
    encoder = TextEncoder(EncoderConfig())
    pair_users = [p["user_id"] for p in pairs]
    seqs, valid = reward_inputs(split, pair_users)
    both = encoder.encode([t for p in pairs for t in (p["chosen"], p["rejected"])])  # user-major, N = 2
    print(f"{len(pairs)} pairs of {run}; original reward model: chosen > rejected in all of them by construction")
    for seed in seeds:
        seeded = replace(cfg, retriever=replace(cfg.retriever, seed=seed))
        model, curve = train_sasrec(seeded, data.dataset.catalog, split, users, prefs, vectors.shape[1])
        r = rewards(model, both, seqs, valid, k=cfg.preference_dpo.reward_k)  # (pairs, 2)
        same = int((r[:, 0] > r[:, 1]).sum())
        ties = int((r[:, 0] == r[:, 1]).sum())
        lo, hi = wilson(same, len(pairs))
        print(
            f"seed {seed}: same order {same}/{len(pairs)} = {same / len(pairs):.2f} [{lo:.2f}, {hi:.2f}], "
            f"tied {ties}, reversed {len(pairs) - same - ties}; "
            f"mean |margin| {np.abs(r[:, 0] - r[:, 1]).mean():.4f} "
            f"(original {np.mean([p['reward_chosen'] - p['reward_rejected'] for p in pairs]):.4f}); "
            f"best validation NDCG@10 {max(e['NDCG@10'] for e in curve):.4f} after {len(curve)} epochs"
        )


if __name__ == "__main__":
    app()
