"""The cold-start protocol: nothing held out reaches a training input, the halves are disjoint, events see
only the past, and the fusion weight of a slice is read off validation alone."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training import ranking_metrics as M
from training.cold_split import cold_split, held_out_items
from training.cold_start import _choose_weight


def _interactions(users: int = 60, items: int = 50, seed: int = 0) -> pd.DataFrame:
    """Item i is released at time 10 * i: later items first appear later. Each user rates 12 released items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = int(rng.integers(0, 300))
        picked = sorted(rng.choice(items, size=12, replace=False) + 1, key=lambda i: max(10 * i, start))
        for n, i in enumerate(picked):
            rows.append((f"u{u}", int(i), 4.0, max(10 * int(i), start) + n))
    return pd.DataFrame(rows, columns=["user_id", "item", "rating", "timestamp"])


def test_nothing_held_out_reaches_training_and_events_see_only_the_past():
    frame = _interactions()
    split = cold_split(frame, num_items=50, item_share=0.2, user_share=0.2, ks=(1, 3), seed=0)
    held = {int(i) for half in split.new_items.values() for i in half}
    assert held == set(held_out_items(frame, 0.2)) and len(held) == 10
    first_seen = frame.sort_values("timestamp", kind="stable").drop_duplicates("item")["item"].tolist()
    assert held == set(first_seen[-10:])  # the latest to appear
    assert not set(split.new_items["valid"]) & set(split.new_items["test"])
    new_users = set(split.new_users["valid"]) | set(split.new_users["test"])
    assert not set(split.new_users["valid"]) & set(split.new_users["test"]) and len(new_users) == 12
    # no held-out item or user in any training sequence (what SASRec and the content maps are fit on)
    assert not split.training_items() & held and not set(split.train.users) & new_users
    assert not split.known[list(held)].any() and not split.known[0]
    for half, events in split.item_events.items():
        assert events
        for e in events:
            assert e.target in set(split.new_items[half]) and not set(e.history) & held and e.user not in new_users
            past = frame[(frame.user_id == e.user)].sort_values("timestamp", kind="stable")["item"].tolist()
            assert list(e.history) == past[: len(e.history)] and past[len(e.history)] == e.target
    for k, halves in split.user_events.items():
        for half, events in halves.items():
            assert all(len(e.history) == k and e.user in split.new_users[half] for e in events)
            assert all(split.known[e.target] and split.known[list(e.history)].all() for e in events)


def test_the_weight_is_chosen_on_validation_and_must_clear_a_paired_ci():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 30, size=400)
    better = np.maximum(base - 5, 0)  # the LLM moves every target up: a gain the CI supports
    valid = {"w=0": base, "w=0.5": better, "w=1": base}
    weight, detail = _choose_weight(valid, (0.0, 0.5, 1.0), n_boot=500)
    assert weight == 0.5 and detail["gain"]["ci_low"] > 0
    noisy = base.copy()
    noisy[:3] = 0  # a gain on 3 of 400 lists: best on validation, but the CI spans 0
    weight, detail = _choose_weight({"w=0": base, "w=0.5": noisy, "w=1": base}, (0.0, 0.5, 1.0), n_boot=500)
    assert detail["best"] == 0.5 and weight == 0.0
    assert M.per_user(noisy)["NDCG@10"].mean() > M.per_user(base)["NDCG@10"].mean()
