"""SASRec training: windows, learning a deterministic pattern, preference signal, determinism, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.sasrec import SASRecConfig
from training import ranking_metrics as M
from training.retriever import RetrieverTrainConfig, make_windows, rank_targets, score_users, train_retriever


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def stepping_users(n_users: int = 50, n_items: int = 40, seed: int = 0) -> tuple[dict, dict]:
    """Each user walks the catalog by +1 from a random start; the validation item is the next step."""
    rng = np.random.default_rng(seed)
    train, valid = {}, {}
    for u in range(n_users):
        start, length = int(rng.integers(0, n_items)), int(rng.integers(6, 14))
        walk = [(start + i) % n_items + 1 for i in range(length + 1)]
        train[f"u{u}"], valid[f"u{u}"] = walk[:-1], walk[-1]
    return train, valid


def tiny(num_items: int, **kw) -> SASRecConfig:
    return SASRecConfig(num_items=num_items, max_len=16, hidden=32, layers=1, heads=2, dropout=0.1, **kw)


def test_windows_cover_every_target_once():
    seq = list(range(1, 12))
    assert make_windows(seq, 4, all_windows=False) == [([7, 8, 9, 10], [8, 9, 10, 11])]
    windows = make_windows(seq, 4, all_windows=True)
    targets = sorted(t for _, ys in windows for t in ys)
    assert targets == list(range(2, 12))
    assert all(len(x) == len(y) <= 4 for x, y in windows)
    assert make_windows([5], 4, all_windows=True) == []


def test_learns_a_deterministic_pattern_well_above_random():
    train, valid = stepping_users()
    cfg = RetrieverTrainConfig(epochs=8, batch_size=16, lr=5e-3, patience=8, seed=0)
    model, history = train_retriever(cfg, tiny(40), train, valid, progress=False)
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    best = max(row["NDCG@10"] for row in history)
    assert best > 0.6  # a random ranking of ~30 unseen items gives about 0.15
    ranks = rank_targets(model, train, valid, None, list(train))
    assert M.summarize(ranks)["NDCG@10"] == pytest.approx(best)  # the best state is the one returned
    assert not model.training


def group_users(seed: int = 0) -> tuple[dict, dict, dict]:
    """Two groups whose next item (31 or 32) depends on a bit seen only in the preference vector.

    "teach" users have 8 random items then their group's item; "probe" users have only the 8 random
    items and their group's item as validation target, so nothing in any history reveals their group.
    """
    rng = np.random.default_rng(seed)
    train, valid, prefs = {}, {}, {}
    for u in range(240):
        group, noise = u % 2, [int(i) for i in rng.integers(1, 31, size=8)]
        pref = rng.normal(0.0, 0.1, size=8).astype(np.float32)
        pref[group] += 1.0
        user = f"u{u}"
        prefs[user] = pref
        if u < 160:
            train[user] = [*noise, 31 + group]
        else:
            train[user], valid[user] = noise, 31 + group
    return train, valid, prefs


GROUP_CFG = RetrieverTrainConfig(epochs=15, batch_size=32, lr=5e-3, patience=15, seed=0)


@pytest.fixture(scope="module")
def plain_group_ndcg() -> float:
    train, valid, _ = group_users()
    torch.set_num_threads(1)
    _, history = train_retriever(GROUP_CFG, tiny(32), train, valid, progress=False)
    return max(row["NDCG@10"] for row in history)


@pytest.mark.parametrize("fusion", ["concat", "token", "add", "residual"])
def test_preferences_carrying_signal_beat_plain_sasrec(plain_group_ndcg, fusion):
    train, valid, prefs = group_users()
    assert plain_group_ndcg < 0.9  # can only guess the group: about (1 + 1/log2(3)) / 2 = 0.82 at best
    model, history = train_retriever(
        GROUP_CFG, tiny(32, pref_dim=8, fusion=fusion), train, valid, prefs, progress=False
    )
    assert max(row["NDCG@10"] for row in history) > plain_group_ndcg + 0.1
    flipped = {u: p[[1, 0, *range(2, 8)]] for u, p in prefs.items()}  # swap the group bit
    probe = list(valid)
    scores = score_users(model, train, flipped, probe)
    assert scores.shape == (len(probe), 33)
    wrong = np.array([63 - valid[u] for u in probe])  # the other group's item
    assert (M.ranks_of_targets(scores, wrong, [train[u] for u in probe]) == 0).mean() > 0.8


def test_training_is_deterministic_given_the_seed():
    train, valid = stepping_users(20)
    cfg = RetrieverTrainConfig(epochs=2, batch_size=8, seed=3)

    def without_time(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    torch.manual_seed(123)
    a, history_a = train_retriever(cfg, tiny(40), train, valid, progress=False)
    after = torch.rand(1)
    b, history_b = train_retriever(cfg, tiny(40), train, valid, progress=False)
    assert without_time(history_a) == without_time(history_b)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # training forks the RNG: the caller's stream is untouched


def test_all_windows_train_on_long_histories():
    train, valid = stepping_users(20)
    cfg = RetrieverTrainConfig(epochs=2, max_len=4, windows="all", eval_every=2)
    model, history = train_retriever(cfg, tiny(40), train, valid, progress=False)
    assert [row["epoch"] for row in history] == [2] and np.isfinite(history[0]["loss"])


def test_early_stopping_keeps_the_best_state():
    train, valid = stepping_users(20)
    cfg = RetrieverTrainConfig(epochs=50, lr=1e-9, patience=2, seed=0)  # nothing improves after epoch 1
    model, history = train_retriever(cfg, tiny(40), train, valid, progress=False)
    assert len(history) == 3
    ranks = rank_targets(model, train, valid, None, list(train))
    assert M.summarize(ranks)["NDCG@10"] == pytest.approx(history[0]["NDCG@10"])


def test_inputs_are_checked():
    train, valid = stepping_users(5)
    cfg = RetrieverTrainConfig(epochs=1)
    prefs = {u: np.zeros(8, np.float32) for u in train}
    with pytest.raises(ValueError, match="pref_dim == 0"):
        train_retriever(cfg, tiny(40), train, valid, prefs, progress=False)
    with pytest.raises(ValueError, match="needs prefs"):
        train_retriever(cfg, tiny(40, pref_dim=8), train, valid, None, progress=False)
    with pytest.raises(ValueError, match="no preference vector"):
        train_retriever(cfg, tiny(40, pref_dim=8), train, valid, dict(list(prefs.items())[:2]), progress=False)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        train_retriever(cfg, tiny(40, pref_dim=4), train, valid, prefs, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        train_retriever(RetrieverTrainConfig(max_len=17), tiny(40), train, valid, progress=False)
    with pytest.raises(ValueError, match="validation item"):
        train_retriever(cfg, tiny(40), train, {}, progress=False)
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"windows": "some"}, {"patience": 0}, {"num_threads": -1}):
        with pytest.raises(ValueError):
            RetrieverTrainConfig(**bad)


def test_positions_whose_target_the_text_describes_train_without_the_preference():
    from training.retriever import _training_tensors

    seqs = {"a": [1, 2, 3, 4], "b": [5, 6]}
    prefs = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}
    inputs, targets, pref, mask = _training_tensors(seqs, prefs, 4, True, described={"a": [3, 4]})
    assert targets.tolist() == [[0, 2, 3, 4], [0, 0, 0, 6]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # a's targets 3 and 4 are in its text
    assert _training_tensors(seqs, prefs, 4, True)[3] is None
