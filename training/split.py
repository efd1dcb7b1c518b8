"""Leave-one-out split by time (SPEC section 3).

For every user with at least ``min_interactions`` interactions: the last item is the test item, the one
before it the validation item, the rest training, in time order. Timestamps tie often (in
MovieLens-100K the test and validation items share a timestamp for 415 of 943 users), so the sort is
stable: ties keep the file's order. A different tie rule changes the targets, and with them every
number compared with a peer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class UserSplit:
    train: list[int]  # item indices, time order
    valid: int
    test: int
    train_ratings: list[float]  # aligned with train (NaN if implicit)


@dataclass
class Split:
    users: dict[str, UserSplit]  # insertion order = sorted user ids
    dropped_users: int

    def ids(self) -> list[str]:
        return list(self.users)


def leave_one_out(interactions: pd.DataFrame, min_interactions: int = 5) -> Split:
    frame = interactions.reset_index(drop=True)
    frame = frame.assign(_order=range(len(frame)))
    frame = frame.sort_values(["user_id", "timestamp", "_order"], kind="stable")
    users: dict[str, UserSplit] = {}
    dropped = 0
    for user, group in frame.groupby("user_id", sort=True):
        items = group["item"].tolist()
        if len(items) < min_interactions:
            dropped += 1
            continue
        ratings = group["rating"].astype(float).tolist()
        users[str(user)] = UserSplit(train=items[:-2], valid=items[-2], test=items[-1], train_ratings=ratings[:-2])
    if dropped:
        log.warning("leave-one-out: %d users with fewer than %d interactions left out", dropped, min_interactions)
    if not users:
        raise ValueError(f"no user has at least {min_interactions} interactions; nothing to evaluate")
    return Split(users=users, dropped_users=dropped)
