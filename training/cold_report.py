"""The cold-start protocol's report: ``cold_start.json`` (everything, per seed), ``cold_start.md`` (the test
table with paired CIs and the weights chosen on validation) and ``cold_start.png`` (NDCG@10 per slice and arm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rundir.manifest import atomic_write_text


def _ci(row: dict[str, Any]) -> str:
    d = row.get("vs best non-LLM")
    if d is None:
        return "(best non-LLM arm)"
    return f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def markdown(doc: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, doc["seeds"]))
    lines = [
        f"# Cold start on {doc['dataset']} (seeds {seeds})",
        "",
        "Test half; NDCG@10 and Recall@10 per event averaged over the seeds (sd: of the per-seed means); CI: paired "
        "bootstrap (95 %) against the best non-LLM arm of the slice.",
        "",
    ]
    for name, table in doc["test"].items():
        lines += [f"## {name} ({table['events']} events)", "", "| arm | NDCG@10 | sd | Recall@10 | vs best non-LLM |"]
        lines.append("|---|---|---|---|---|")
        for row in table["rows"]:
            lines.append(
                f"| {row['arm']} | {row['NDCG@10']:.4f} | {row['NDCG@10 sd over seeds']:.4f} | {row['Recall@10']:.4f} "
                f"| {_ci(row)} |"
            )
        lines.append("")
    weights = [s["weights"] for s in doc["per_seed"] if s["weights"]]
    if weights:
        lines += ["## Fusion weights chosen on the validation half", "", "| slice | " + " | ".join(
            f"seed {s['seed']}" for s in doc["per_seed"]) + " |", "|---|" + "---|" * len(doc["per_seed"])]  # fmt: skip
        for name in weights[0]:
            cells = []
            for s in doc["per_seed"]:
                w = s["weights"].get(name, {})
                gain = w.get("gain")
                note = ""
                if gain:
                    ci = f"[{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]"
                    note = f" (best {w.get('best'):g}, gain {gain['diff']:+.4f} {ci})"
                cells.append(f"{w.get('chosen', 0):g}{note}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    info = doc["per_seed"][0]["info"]
    lines += [
        f"Held-out items: {info['held_out_items']}; warm items the maps were fit on: {info['warm_items']}. "
        "Content tower "
        f"ridge alpha {info['content_tower']['alpha']:g} (held-out R^2 {info['content_tower']['holdout_r2']:.3f}); "
        f"genre/decade alpha {info['genre_decade']['alpha']:g} (R^2 {info['genre_decade']['holdout_r2']:.3f}).",
        f"Stage seconds: {json.dumps(doc['stage_seconds'])}",
        "",
        "![NDCG@10 by slice and arm](cold_start.png)",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = list(doc["test"])
    arms = list(dict.fromkeys(r["arm"] for name in slices for r in doc["test"][name]["rows"]))  # one y axis for all
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], slices, strict=True):
        rows = {r["arm"]: r for r in doc["test"][name]["rows"]}
        values = [rows[a]["NDCG@10"] if a in rows else 0.0 for a in arms]
        spread = [rows[a]["NDCG@10 sd over seeds"] if a in rows else 0.0 for a in arms]
        ax.barh(range(len(arms)), values, xerr=spread)
        ax.set_yticks(range(len(arms)), arms)
        ax.set_title(f"{name} ({doc['test'][name]['events']})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("NDCG@10 (test)", fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: dict[str, Any], out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cold_start.json", json.dumps(doc))
    plot(doc, out / "cold_start.png")
    atomic_write_text(out / "cold_start.md", markdown(doc))
