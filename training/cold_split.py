"""The cold-start protocol's data (SPEC section 10): held-out items and users, and the events to rank.

- **New items**: the ``item_share`` of items that first appear latest in the data (a new release is, by
  definition, what arrives last; a random share would hold out old catalogue items that happen to be rare)
  and every interaction with them leave all training inputs. They are split into two disjoint halves by
  alternating order of first appearance (both halves span the same period): validation-new, test-new. An
  **event** is a user's first interaction with a held-out item of a half; its history is what the user did
  before it (never a held-out item, by construction).
- **New users**: a seeded ``user_share`` of users leave all training; halved into validation and test. Their
  sequence, without held-out items, reveals its first k items; the next one is the target.
- **Training**: every interaction of the remaining users with the remaining items, split leave-one-out by
  time (``training.split``) for SASRec's early stopping.

Timestamps tie often; every sort here is stable (ties keep the file's order), as in ``training.split``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from training.split import Split, leave_one_out


@dataclass(frozen=True)
class Event:
    user: str
    history: tuple[int, ...]  # catalog indices before the target, time order
    target: int


@dataclass
class ColdSplit:
    train: Split  # the warm users' leave-one-out split over the warm items
    known: np.ndarray  # (N+1,) bool: items that stay in the catalog (row 0, padding, False)
    new_items: dict[str, np.ndarray]  # "valid" | "test" -> held-out item indices of that half
    item_events: dict[str, list[Event]]  # "valid" | "test" -> first interactions with that half's items
    new_users: dict[str, list[str]]  # "valid" | "test" -> held-out users
    user_events: dict[int, dict[str, list[Event]]] = field(default_factory=dict)  # k -> half -> events

    def training_items(self) -> set[int]:
        return {i for u in self.train.users.values() for i in (*u.train, u.valid, u.test)}


def _ordered(interactions: pd.DataFrame) -> pd.DataFrame:
    frame = interactions.reset_index(drop=True)
    return frame.assign(_order=range(len(frame))).sort_values(["timestamp", "_order"], kind="stable")


def held_out_items(interactions: pd.DataFrame, share: float) -> list[int]:
    """The ``share`` of items whose first interaction comes latest, in order of first appearance."""
    first = _ordered(interactions).drop_duplicates("item", keep="first")["item"].tolist()
    n = max(2, int(round(len(first) * share)))
    return [int(i) for i in first[-n:]]


def cold_split(
    interactions: pd.DataFrame,
    num_items: int,
    *,
    item_share: float = 0.2,
    user_share: float = 0.2,
    ks: tuple[int, ...] = (1, 3, 5),
    min_interactions: int = 5,
    seed: int = 0,
) -> ColdSplit:
    """Hold out items and users (see the module text); ``seed`` draws the new users."""
    new = held_out_items(interactions, item_share)
    halves = {"valid": np.array(new[0::2], np.int64), "test": np.array(new[1::2], np.int64)}
    held = set(new)
    users = sorted(interactions["user_id"].astype(str).unique())
    rng = np.random.default_rng(seed)
    cold_users = sorted(rng.choice(users, size=max(2, int(round(len(users) * user_share))), replace=False).tolist())
    user_halves = {"valid": cold_users[0::2], "test": cold_users[1::2]}
    cold_set = set(cold_users)

    ordered = _ordered(interactions)
    warm = ordered[~ordered["item"].isin(held) & ~ordered["user_id"].astype(str).isin(cold_set)]
    train = leave_one_out(warm.drop(columns="_order").sort_index(), min_interactions)
    known = np.ones(num_items + 1, bool)
    known[0] = False
    known[new] = False

    half_of = {int(i): h for h, items in halves.items() for i in items}
    item_events: dict[str, list[Event]] = {"valid": [], "test": []}
    user_events: dict[int, dict[str, list[Event]]] = {k: {"valid": [], "test": []} for k in ks}
    user_half = {u: h for h, us in user_halves.items() for u in us}
    for user, group in ordered.groupby(ordered["user_id"].astype(str), sort=True):
        items = [int(i) for i in group["item"]]
        if user in cold_set:  # a new user: the first k known items revealed, the next one the target
            seq = [i for i in items if known[i]]
            for k in ks:
                if len(seq) > k:
                    user_events[k][user_half[user]].append(Event(user, tuple(seq[:k]), seq[k]))
            continue
        first = next((p for p, i in enumerate(items) if i in held), None)
        if first is not None and first > 0:  # a known user's first held-out item, after some history
            item_events[half_of[items[first]]].append(Event(user, tuple(items[:first]), items[first]))
    return ColdSplit(train, known, halves, item_events, user_halves, user_events)
