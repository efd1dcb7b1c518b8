"""The human report of a run: ``report.md`` with the results table, the confidence intervals, and PNG
plots (metrics per system, validation curves, stage times). Reads the ``metrics.json`` document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC_COLUMNS = ("NDCG@5", "NDCG@10", "NDCG@20", "Recall@5", "Recall@10", "Recall@20", "MRR@10")


def _plot_systems(doc: dict[str, Any], path: Path) -> None:
    rows = doc["rows"]
    names = [r["system"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for offset, metric in ((-width / 2, "NDCG@10"), (width / 2, "Recall@10")):
        xs = [i + offset for i in range(len(rows))]
        bars = ax.bar(xs, [r[metric] for r in rows], width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=12, fontsize=8)
    ax.set_ylabel("test metric (all users, full ranking)")
    ax.set_title(f"Stages on {doc.get('users')} users")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(doc: dict[str, Any], path: Path) -> bool:
    curves = {k: v for k, v in doc.get("curves", {}).items() if v}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, curve in curves.items():
        ax.plot([p["epoch"] for p in curve], [p["NDCG@10"] for p in curve], label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("Retriever training (early stopping on validation NDCG@10)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_stages(doc: dict[str, Any], path: Path) -> None:
    stages = doc.get("stage_seconds", {})
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(stages), list(stages.values()))
    ax.set_xlabel("seconds")
    ax.set_title("Wall time per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def write_report(folder: Path, doc: dict[str, Any], examples: dict[str, str] | None = None) -> None:
    """Write ``report.md`` and its PNGs into ``folder``."""
    folder = Path(folder)
    _plot_systems(doc, folder / "systems.png")
    has_curves = _plot_curves(doc, folder / "curves.png")
    _plot_stages(doc, folder / "stages.png")
    lines = ["# Run report", "", f"Test items of {doc.get('users')} users; full ranking over all unseen items.", ""]
    lines += ["| system | " + " | ".join(METRIC_COLUMNS) + " |", "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r[m]) for m in METRIC_COLUMNS if m in r) + " |")
    lines += [
        "",
        "![metrics per system](systems.png)",
        "",
        "## Differences (paired bootstrap, 95% CI)",
        "",
        "| a | b | metric | a - b | 95% CI | users |",
        "|---|---|---|---|---|---|",
    ]
    for c in doc.get("comparisons", []):
        verdict = "" if c["ci_low"] <= 0 <= c["ci_high"] else " **"
        lines.append(
            f"| {c['a']} | {c['b']} | {c['metric']} | {c['diff']:+.4f}{verdict} | "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['n']} |"
        )
    lines += ["", "(** the interval excludes 0.)", ""]
    if "index_recall_at_20_vs_exact" in doc:
        lines += [f"FAISS recall@20 against exact search: {doc['index_recall_at_20_vs_exact']:.4f}", ""]
    if has_curves:
        lines += ["![validation curves](curves.png)", ""]
    lines += ["## Stage times", "", "![stage times](stages.png)", ""]
    lines += [f"- {name}: {secs:.1f} s" for name, secs in doc.get("stage_seconds", {}).items()]
    if examples:
        lines += ["", "## Example preference texts", ""]
        for user, text in examples.items():
            lines += [f"**user {user}**: {text}", ""]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
