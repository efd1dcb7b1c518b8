"""The cold-start protocol's report: ``cold_start.json`` (everything, per seed), ``cold_start.md`` (the test
table with paired CIs and the weights chosen on validation) and ``cold_start.png`` (NDCG@10 per slice and arm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rundir.manifest import atomic_write_text


def _ci(d: dict[str, Any] | None) -> str:
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
                f"| {_ci(row.get('vs best non-LLM'))} |"
            )
        lines.append("")
    lines += _pairs_table(doc)
    scorers = list(dict.fromkeys(m for s in doc["per_seed"] for m in s.get("weights_by_model") or {}))
    for scorer in scorers:
        lines += _weights_table(doc, scorer)
    lifts = [s["info"].get("lift") for s in doc["per_seed"]]
    if all(lifts):
        lines += [
            "## New items lifted in the whole catalog (chosen on validation: new-item events + warm validation items)",
            "",
            "| seed | lift (x row score sd) | warm users' test NDCG@10 at lift 0 | at the chosen lift |",
            "|---|---|---|---|",
        ]
        for s, lift in zip(doc["per_seed"], lifts, strict=True):
            warm, chosen = lift["test_warm_ndcg10"], lift["chosen"]
            lines.append(f"| {s['seed']} | {chosen:g} | {warm['0']:.4f} | {warm[format(chosen, 'g')]:.4f} |")
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


def _pairs_table(doc: dict[str, Any]) -> list[str]:
    """Each contrast (training.cold_start.CONTRASTS) per slice: NDCG@10 difference with its paired CI."""
    pairs = list(dict.fromkeys(p for table in doc["test"].values() for p in table.get("pairs", {})))
    if not pairs:
        return []
    names = list(doc["test"])
    lines = [
        "## What the LLM changes, one step at a time (test NDCG@10 difference, paired CI)",
        "",
        "| contrast | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for pair in pairs:
        cells = [doc["test"][n].get("pairs", {}).get(pair) for n in names]
        lines.append(f"| {pair} | " + " | ".join(_ci(c) if c else "" for c in cells) + " |")
    return [*lines, ""]


def _weights_table(doc: dict[str, Any], scorer: str) -> list[str]:
    seeds = doc["per_seed"]
    lines = [
        f"## Fusion weights of the {scorer} scorer chosen on the validation half",
        "",
        "| slice | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    names = list(dict.fromkeys(n for s in seeds for n in (s.get("weights_by_model") or {}).get(scorer, {})))
    for name in names:
        cells = []
        for s in seeds:
            w = (s.get("weights_by_model") or {}).get(scorer, {}).get(name, {})
            gain = w.get("gain")
            note = ""
            if gain:
                ci = f"[{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]"
                note = f" (best {w.get('best'):g}, gain {gain['diff']:+.4f} {ci})"
            cells.append(f"{w.get('chosen', 0):g}{note}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without per-event ranks and training curves: what docs/results keeps (cold_start_summary.json)."""
    seeds = []
    for s in doc["per_seed"]:
        info = {**s["info"], "adapter": {m: {k: v for k, v in a.items() if k != "curves"}
                                         for m, a in s["info"].get("adapter", {}).items()}}  # fmt: skip
        seeds.append({**{k: v for k, v in s.items() if k != "ranks"}, "info": info})
    return {**doc, "per_seed": seeds}


def write_report(doc: dict[str, Any], out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cold_start.json", json.dumps(doc))
    atomic_write_text(out / "cold_start_summary.json", json.dumps(summary(doc), indent=1))
    plot(doc, out / "cold_start.png")
    atomic_write_text(out / "cold_start.md", markdown(doc))
