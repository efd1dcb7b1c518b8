"""The human report of a run: ``report.md`` with the results table, the confidence intervals, and PNG
plots (metrics per system, validation curves, stage times). Reads the ``metrics.json`` document.

When the run has the DPO loop or the re-rank job (training/loop.py), also: NDCG@10 per stage, the reward
distribution of chosen vs rejected samples, and the DPO/SFT training curves (loss, reward margin,
preference accuracy).
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


def _plot_stage_ndcg(doc: dict[str, Any], path: Path) -> None:
    rows = doc["rows"]
    diffs: dict[str, dict[str, Any]] = {}
    for c in doc.get("comparisons", []):  # a row's first NDCG@10 comparison is against its baseline
        if c["metric"] == "NDCG@10":
            diffs.setdefault(c["a"], c)
    fig, ax = plt.subplots(figsize=(9, 4))
    values = [r["NDCG@10"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color=["#999999" if r["system"] not in diffs else "#4c72b0" for r in rows])
    labels = []
    for r in rows:
        c = diffs.get(r["system"])
        labels.append("" if c is None else f"{c['diff']:+.4f}\n[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]")
    ax.bar_label(bars, labels=[f"{v:.4f}\n{extra}" for v, extra in zip(values, labels, strict=True)], fontsize=6)
    ax.set_xticks(range(len(rows)), [r["system"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("test NDCG@10")
    ax.set_ylim(0, max(values) * 1.35 if values and max(values) > 0 else 1)
    ax.set_title("NDCG@10 per stage (difference vs its baseline, 95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_rewards(doc: dict[str, Any], path: Path) -> bool:
    dists = {k: v for k, v in doc.get("reward_distributions", {}).items() if v.get("chosen")}
    if not dists:
        return False
    fig, axes = plt.subplots(1, len(dists), figsize=(5 * len(dists), 3.4), squeeze=False)
    for ax, (name, d) in zip(axes[0], dists.items(), strict=True):
        bins = [i / 20 for i in range(21)]
        ax.hist(d.get("samples", []), bins=bins, density=True, alpha=0.3, color="gray", label="all samples")
        ax.hist(d["rejected"], bins=bins, density=True, alpha=0.55, label=f"rejected (mean {_mean(d['rejected']):.3f})")
        ax.hist(d["chosen"], bins=bins, density=True, alpha=0.55, label=f"chosen (mean {_mean(d['chosen']):.3f})")
        ax.set_xlabel("reward: validation NDCG@k")
        ax.set_title(f"{name}: {len(d['chosen'])} pairs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_dpo_curves(doc: dict[str, Any], path: Path) -> bool:
    runs = {k: v for k, v in doc.get("dpo_curves", {}).items() if v.get("step")}
    if not runs:
        return False
    panels = (
        ("loss", "DPO loss", True),
        ("rewards/margins", "reward margin (chosen - rejected)", True),
        ("rewards/accuracies", "preference accuracy", True),
        ("loss", "SFT loss", False),
    )
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per run on every panel
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (key, title, dpo) in zip(axes, panels, strict=True):
        for name, curve in runs.items():
            ys = curve.get(key)
            if ("rewards/margins" in curve) != dpo or not ys:
                continue
            pts = [(x, y) for x, y in zip(curve["step"], ys, strict=True) if y is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", color=colors[name], label=name)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _loop_lines(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    loop = doc.get("dpo_loop")
    if loop:
        lines += [
            "## Preference DPO loop",
            "",
            f"{loop['dpo_users']} DPO users x {loop['samples_per_user']} samples per round; reward = "
            "validation NDCG@k under the round's augmented SASRec.",
            "",
            "| round | pairs | tied users | sample reward | best of N | greedy reward | greedy after DPO "
            "(DPO users / all) | DPO train s | tok/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in loop["rounds"]:
            check = r.get("reward_check", {})
            after = (
                (
                    f"{check['dpo_users']['before']:.4f} -> {check['dpo_users']['after']:.4f} / "
                    f"{check['all_users']['before']:.4f} -> {check['all_users']['after']:.4f}"
                )
                if check
                else "-"
            )
            train = r.get("train", {})
            lines.append(
                f"| {r['round']} | {r['pairs']['kept']} | {r['pairs']['dropped_ties']} | "
                f"{r['sample_reward_mean']:.4f} | {r['sample_reward_best_mean']:.4f} | "
                f"{r['greedy_reward_mean']:.4f} | {after} | {train.get('train_seconds', '-')} | "
                f"{train.get('tokens_per_second', '-')} |"
            )
        lines.append("")
    rr = doc.get("rerank")
    if rr:
        lines += [
            "## Re-rank job",
            "",
            f"K = {rr['k']} candidates from the served retriever; {rr['scored_users']} of {rr['users']} test "
            f"items are among them (recall@K {rr['candidate_recall']:.4f}), only those prompts are scored "
            f"({rr.get('cold_scored_users', 0)} on the cold slice). Training: {rr['train_lists']} shuffled lists "
            f"from {rr['train_users']} users (negatives {rr['negatives']}), {rr['dpo'].get('pairs', '-')} DPO "
            f"pairs; SFT {rr['sft']['train_seconds']} s, DPO {rr['dpo']['train_seconds']} s. Label prior: "
            f"{rr['debias']} on {rr['calibration_lists']} calibration lists; {rr['permutations']} candidate "
            "order(s) per scored list.",
            "",
        ]
        if rr.get("fusion"):
            f = rr["fusion"]
            lines += [
                f"Fusion weight chosen on {rr['valid_scored_users']} validation lists: **w = {f['chosen']:g}** "
                + ("(the LLM did not help: the service skips it). " if f["chosen"] == 0 else "")
                + "Validation NDCG@10 of the scored lists by weight: "
                + ", ".join(f"{w:g}: {v:.4f}" for w, v in zip(f["weights"], f["valid_ndcg10_of_scored"], strict=True)),
                "",
            ]
        if rr.get("top_label"):
            lines += [
                "![label distributions](labels.png)",
                "",
                "Where the targets sit in the training lists (should be uniform), and where each re-ranker's top "
                "answer falls on the shuffled calibration lists, before and after the label prior is removed "
                "(uniform means no label preference).",
                "",
            ]
        order = {name: o for name, o in rr.get("order", {}).items() if o}
        if order:  # does the LLM follow the retriever's order (position) or find the target?
            lines += [
                "| re-ranker | LLM's top = retriever's top | Spearman with retriever order | "
                "target position before -> after |",
                "|---|---|---|---|",
                *(
                    f"| {name} | {o['top_is_retrievers_top']:.2f} | {o['spearman_with_retriever']:+.2f} | "
                    f"{o['target_position_before']:.2f} -> {o['target_position_after']:.2f} |"
                    for name, o in order.items()
                ),
                "",
            ]
    return lines


def _plot_labels(doc: dict[str, Any], path: Path) -> bool:
    """Training lists' target labels, and each re-ranker's top label on shuffled lists (raw vs de-biased)."""
    rr = doc.get("rerank") or {}
    if not rr.get("top_label"):
        return False
    k = rr["k"]
    letters = [chr(ord("A") + i) for i in range(k)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    targets = rr["train_target_labels"]
    axes[0].bar(letters, [t / max(sum(targets), 1) for t in targets])
    axes[0].axhline(1 / k, color="gray", linestyle="--", linewidth=1)
    axes[0].set_title("target label in training lists")
    width = 0.8 / len(rr["top_label"])
    for j, (name, shares) in enumerate(rr["top_label"].items()):
        axes[1].bar([i + j * width for i in range(k)], shares, width, label=name.replace("LLM re-rank ", ""))
    axes[1].axhline(1 / k, color="gray", linestyle="--", linewidth=1)
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(k)], letters)
    axes[1].set_title("top answer's label on shuffled lists")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_ylabel("share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def write_report(folder: Path, doc: dict[str, Any], examples: dict[str, str] | None = None) -> None:
    """Write ``report.md`` and its PNGs into ``folder``."""
    folder = Path(folder)
    _plot_systems(doc, folder / "systems.png")
    has_curves = _plot_curves(doc, folder / "curves.png")
    _plot_stages(doc, folder / "stages.png")
    has_loop = any(k in doc for k in ("dpo_loop", "rerank"))
    if has_loop:
        _plot_stage_ndcg(doc, folder / "stage_ndcg.png")
    has_rewards = _plot_rewards(doc, folder / "rewards.png")
    has_dpo_curves = _plot_dpo_curves(doc, folder / "dpo_curves.png")
    _plot_labels(doc, folder / "labels.png")
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
    if has_loop:
        lines += ["![NDCG@10 per stage](stage_ndcg.png)", ""] + _loop_lines(doc)
    if has_rewards:
        lines += ["![chosen vs rejected rewards](rewards.png)", ""]
    if has_dpo_curves:
        lines += ["![DPO and SFT training curves](dpo_curves.png)", ""]
    lines += ["## Stage times", "", "![stage times](stages.png)", ""]
    lines += [f"- {name}: {secs:.1f} s" for name, secs in doc.get("stage_seconds", {}).items()]
    if examples:
        lines += ["", "## Example preference texts", ""]
        for user, text in examples.items():
            lines += [f"**user {user}**: {text}", ""]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
