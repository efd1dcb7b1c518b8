"""Preference pairs for DPO (DPO4Rec, Sun et al., arXiv 2410.05939, step 4).

For every training user the LLM sampled N preference texts, each scored by the recommender-feedback
reward (``training.reward``). The pair is (highest, lowest) = (chosen, rejected). Users whose samples
all tie (max == min, e.g. every text left the validation item outside the top k) carry no preference
and are dropped, as in the paper; optionally pairs whose reward margin is below a threshold are dropped
too. Identical texts (after whitespace normalisation) count once, so a pair never has the same text on
both sides.

Tie-breaking is deterministic: among equal maxima the earliest sample wins chosen, among equal minima
the earliest sample is rejected. Rows are plain JSON-friendly dictionaries (``save_pairs``); the DPO
trainer turns them into TRL's conversational format (``training.dpo.dpo_dataset_rows``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

Prompt = list[dict[str, str]] | str  # chat messages (llm.prompts.preference_messages) or a rendered prompt


@dataclass
class PairStats:
    users: int = 0  # users offered
    kept: int = 0  # pairs returned
    dropped_ties: int = 0  # users whose distinct samples all share one reward (or only one distinct text)
    dropped_margin: int = 0  # pairs whose reward margin was below min_margin
    duplicate_texts: int = 0  # samples removed as repeats of an earlier sample of the same user
    empty_texts: int = 0  # samples removed because they were empty


@dataclass
class PairSet:
    rows: list[dict[str, Any]]  # {user_id, prompt, chosen, rejected, reward_chosen, reward_rejected}
    stats: PairStats


def _normalise(text: str) -> str:
    return " ".join(text.split())


def pick_pair(texts: Sequence[str], rewards: Sequence[float]) -> tuple[int, int, int, int] | None:
    """(chosen index, rejected index, duplicates, empties) among one user's samples, or None on a tie.

    Duplicates and empty texts are skipped; the earliest sample wins ties on either side.
    """
    if len(texts) != len(rewards):
        raise ValueError(f"got {len(texts)} texts but {len(rewards)} rewards")
    seen: set[str] = set()
    keep: list[int] = []
    duplicates = empties = 0
    for j, text in enumerate(texts):
        key = _normalise(text)
        if not key:
            empties += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            keep.append(j)
    values = np.asarray([rewards[j] for j in keep], dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"rewards must be finite, got {values.tolist()}")
    if len(keep) < 2 or values.max() == values.min():
        return None
    chosen = keep[int(np.argmax(values))]  # argmax/argmin return the first occurrence
    rejected = keep[int(np.argmin(values))]
    return chosen, rejected, duplicates, empties


def build_pairs(
    prompts: Mapping[str, Prompt],
    texts: Mapping[str, Sequence[str]],
    rewards: Mapping[str, Sequence[float]] | np.ndarray,
    min_margin: float = 0.0,
) -> PairSet:
    """One (chosen, rejected) pair per user with a reward spread, in the order of ``texts``.

    prompts[u]: the prompt that produced user u's samples; texts[u]: the N samples; rewards: per user
    (a mapping) or a (U, N) array whose rows follow ``texts``' order. ``min_margin``: drop pairs whose
    reward_chosen - reward_rejected is below it (0 keeps every non-tied user).
    """
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    users = list(texts)
    if isinstance(rewards, np.ndarray):
        if rewards.ndim != 2 or rewards.shape[0] != len(users):
            raise ValueError(f"rewards array must be (U={len(users)}, N), got {rewards.shape}")
        per_user: Mapping[str, Sequence[float]] = {u: rewards[i] for i, u in enumerate(users)}
    else:
        per_user = rewards
    stats = PairStats(users=len(users))
    rows: list[dict[str, Any]] = []
    for user in users:
        if user not in prompts or user not in per_user:
            raise KeyError(f"user {user!r} has texts but no prompt or rewards")
        samples, values = list(texts[user]), [float(r) for r in per_user[user]]
        picked = pick_pair(samples, values)
        if picked is None:
            stats.dropped_ties += 1
            continue
        chosen, rejected, duplicates, empties = picked
        stats.duplicate_texts += duplicates
        stats.empty_texts += empties
        if values[chosen] - values[rejected] < min_margin:
            stats.dropped_margin += 1
            continue
        rows.append(
            {
                "user_id": user,
                "prompt": prompts[user],
                "chosen": samples[chosen].strip(),
                "rejected": samples[rejected].strip(),
                "reward_chosen": values[chosen],
                "reward_rejected": values[rejected],
            }
        )
    stats.kept = len(rows)
    return PairSet(rows=rows, stats=stats)


def save_pairs(path: Path, pairs: PairSet) -> None:
    """``pairs.jsonl`` rows plus ``<name>.stats.json`` beside it."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in pairs.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    path.with_suffix(".stats.json").write_text(json.dumps(asdict(pairs.stats), indent=2))


def load_pairs(path: Path) -> PairSet:
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    stats_path = path.with_suffix(".stats.json")
    stats = PairStats(**json.loads(stats_path.read_text())) if stats_path.is_file() else PairStats(kept=len(rows))
    return PairSet(rows=rows, stats=stats)
