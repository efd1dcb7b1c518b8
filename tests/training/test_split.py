"""Leave-one-out split by time: stable ties, no leak of the test item."""

import pandas as pd
import pytest

from training.split import leave_one_out


def _frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item", "rating", "timestamp"])


def test_last_is_test_previous_is_valid_and_ties_keep_file_order():
    rows = [
        ("u", 1, 5.0, 10),
        ("u", 2, 4.0, 30),
        ("u", 3, 3.0, 20),
        ("u", 4, 2.0, 30),
        ("u", 5, 1.0, 5),
        ("v", 9, 1.0, 1),
    ]
    split = leave_one_out(_frame(rows), min_interactions=5)
    user = split.users["u"]
    # time order: 5 (5), 1 (10), 3 (20), then 2 and 4 tie at 30 and keep file order
    assert user.train == [5, 1, 3] and user.valid == 2 and user.test == 4
    assert user.train_ratings == [1.0, 5.0, 3.0]
    assert "v" not in split.users and split.dropped_users == 1


def test_no_test_or_valid_item_in_training_part():
    rows = [(f"u{u}", i, 1.0, (i * 7 + u) % 5) for u in range(20) for i in range(1, 9)]
    split = leave_one_out(_frame(rows))
    for user in split.users.values():
        assert user.test not in user.train and user.valid not in user.train
        assert len(user.train) == 6


def test_movielens_ties(ml100k):
    split = leave_one_out(ml100k.interactions)
    assert len(split.users) == 943
    # 415 users have valid and test at the same timestamp; the file order decides them
    frame = ml100k.interactions
    stamp = dict(zip(zip(frame.user_id, frame.item, strict=True), frame.timestamp, strict=True))
    ties = sum(stamp[(u, s.valid)] == stamp[(u, s.test)] for u, s in split.users.items())
    assert ties == 415


def test_no_user_left():
    with pytest.raises(ValueError, match="at least 5"):
        leave_one_out(_frame([("u", 1, 1.0, 1)]))


def test_preference_prompts_never_see_valid_or_test(ml100k):
    from training.stages import prompt_histories

    split = leave_one_out(ml100k.interactions)
    histories = prompt_histories(split, split.ids())
    for user, (items, ratings) in histories.items():
        assert split.users[user].valid not in items and split.users[user].test not in items
        assert len(items) == len(ratings)
