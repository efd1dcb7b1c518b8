"""training.pairs: (highest, lowest) reward pairs, ties dropped, duplicates removed, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from training.pairs import build_pairs, load_pairs, pick_pair, save_pairs


def prompt(user: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"history of {user}"}]


def test_chosen_is_the_highest_and_rejected_the_lowest_reward() -> None:
    texts = {"a": ["mid", "best", "worst", "good"], "b": ["x", "y", "v", "w"]}
    rewards = np.array([[0.3, 0.9, 0.1, 0.5], [0.0, 0.2, 0.1, 0.1]])  # (U, N), rows in texts' order
    out = build_pairs({u: prompt(u) for u in texts}, texts, rewards)
    assert build_pairs({u: prompt(u) for u in texts}, texts, {"a": rewards[0], "b": rewards[1]}) == out
    assert [r["user_id"] for r in out.rows] == ["a", "b"]
    a, b = out.rows
    assert (a["chosen"], a["rejected"], a["reward_chosen"], a["reward_rejected"]) == ("best", "worst", 0.9, 0.1)
    assert (b["chosen"], b["rejected"]) == ("y", "x")
    assert a["prompt"] == prompt("a")
    assert all(r["reward_chosen"] > r["reward_rejected"] for r in out.rows)
    assert out.stats.kept == 2 and out.stats.dropped_ties == 0 and out.stats.users == 2


def test_users_whose_samples_all_tie_are_dropped() -> None:
    texts = {"tie": ["a", "b", "c"], "zero": ["d", "e"], "ok": ["f", "g"]}
    rewards = {"tie": [0.5, 0.5, 0.5], "zero": [0.0, 0.0], "ok": [0.0, 1.0]}
    out = build_pairs({u: prompt(u) for u in texts}, texts, rewards)
    assert [r["user_id"] for r in out.rows] == ["ok"]
    assert out.stats.dropped_ties == 2 and out.stats.kept == 1


def test_ties_among_maxima_and_minima_break_to_the_earliest_sample() -> None:
    texts = ["t0", "t1", "t2", "t3", "t4"]
    rewards = [0.0, 1.0, 0.0, 1.0, 0.5]
    assert pick_pair(texts, rewards)[:2] == (1, 0)
    for _ in range(3):  # and the same every time
        assert pick_pair(texts, rewards)[:2] == (1, 0)


def test_duplicate_and_empty_texts_count_once_or_not_at_all() -> None:
    # "same" twice (modulo whitespace) with equal rewards, plus an empty sample: one distinct pair remains
    texts = {"a": ["same text", " same  text ", "", "other"], "b": ["dup", "dup"]}
    rewards = {"a": [0.2, 0.2, 1.0, 0.7], "b": [0.0, 0.0]}
    out = build_pairs({u: prompt(u) for u in texts}, texts, rewards)
    (row,) = out.rows
    assert (row["chosen"], row["rejected"]) == ("other", "same text")  # the empty text's 1.0 is ignored
    assert out.stats.duplicate_texts == 1 and out.stats.empty_texts == 1
    assert out.stats.dropped_ties == 1  # "b": one distinct text is no pair


def test_min_margin_drops_weak_pairs() -> None:
    texts = {"weak": ["a", "b"], "strong": ["c", "d"]}
    rewards = {"weak": [0.50, 0.45], "strong": [0.0, 0.63]}
    out = build_pairs({u: prompt(u) for u in texts}, texts, rewards, min_margin=0.1)
    assert [r["user_id"] for r in out.rows] == ["strong"]
    assert out.stats.dropped_margin == 1 and out.stats.kept == 1
    with pytest.raises(ValueError, match="min_margin"):
        build_pairs({}, {}, {}, min_margin=-1)


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="finite"):
        pick_pair(["a", "b"], [0.0, float("nan")])
    with pytest.raises(ValueError, match=r"\(U=1, N\)"):
        build_pairs({"a": prompt("a")}, {"a": ["x", "y"]}, np.zeros((2, 2)))
    with pytest.raises(KeyError, match="no prompt"):
        build_pairs({}, {"a": ["x", "y"]}, {"a": [0.0, 1.0]})


def test_save_and_load_round_trip(tmp_path) -> None:
    texts = {"a": ["x", "y"], "b": ["z", "w"]}
    out = build_pairs({u: prompt(u) for u in texts}, texts, {"a": [1.0, 0.0], "b": [0.0, 0.0]})
    save_pairs(tmp_path / "pairs.jsonl", out)
    back = load_pairs(tmp_path / "pairs.jsonl")
    assert back.rows == out.rows and back.stats == out.stats
