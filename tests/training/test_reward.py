"""training.reward: NDCG@k of the validation item under the preference-fused SASRec, checked by hand.

The SASRec here is a real ``retrieval.sasrec.SASRec`` whose weights are set so that the preference vector
*is* the item scores: concat fusion with ``fuse_proj = [0 | I]`` keeps only the adapted preference, the
adaptor ``[I; -I] -> GELU -> [I, -I]`` is the identity (GELU(x) - GELU(-x) = x), and item ``i``'s
embedding is the unit vector ``e_{i-1}``. So ``score(item i) = pref[i - 1]`` and every rank is known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.sasrec import SASRec, SASRecConfig
from training.reward import reward_inputs, rewards, validation_ranks
from training.split import Split, UserSplit

N_ITEMS = 6
DIM = 8


def controlled_sasrec(num_items: int = N_ITEMS, dim: int = DIM) -> SASRec:
    """A SASRec whose full-ranking scores equal the first ``num_items`` entries of the preference vector."""
    cfg = SASRecConfig(
        num_items=num_items,
        max_len=5,
        hidden=dim,
        layers=1,
        heads=2,
        dropout=0.0,
        pref_dim=dim,
        fusion="concat",
        adaptor_hidden=2 * dim,
    )
    model = SASRec(cfg).eval()
    eye = torch.eye(dim)
    with torch.no_grad():
        model.adaptor[0].weight.copy_(torch.cat([eye, -eye]))  # (2D, D)
        model.adaptor[0].bias.zero_()
        model.adaptor[3].weight.copy_(torch.cat([eye, -eye], dim=1))  # (D, 2D)
        model.adaptor[3].bias.zero_()
        model.fuse_proj.weight.copy_(torch.cat([torch.zeros(dim, dim), eye], dim=1))  # (H, 2H): drop the sequence
        model.fuse_proj.bias.zero_()
        model.item_embedding.weight.zero_()
        model.item_embedding.weight[1 : num_items + 1] = eye[:num_items]
    return model


def pref(item_scores: list[float]) -> np.ndarray:
    out = np.zeros(DIM, dtype=np.float32)
    out[: len(item_scores)] = item_scores
    return out


def test_the_controlled_model_scores_items_by_the_preference_vector() -> None:
    model = controlled_sasrec()
    scores = model.full_sort_predict([[1, 2]], pref([0.6, -0.5, 0.4, 0.3, 0.2, 0.1])[None])
    np.testing.assert_allclose(scores[0, 1:].numpy(), [0.6, -0.5, 0.4, 0.3, 0.2, 0.1], atol=1e-5)


def test_rewards_match_hand_computed_ndcg() -> None:
    model = controlled_sasrec()
    # user a: trained on items 1, 2 (excluded from the ranking though they score highest); target item 5.
    # user b: trained on item 6; target item 1.
    seqs, valid = [[1, 2], [6]], [5, 1]
    vectors = np.stack(
        [
            pref([6, 5, 4, 3, 2, 1]),  # a: 3 > 4 > 5 among unseen -> rank 2 -> 1/log2(4) = 0.5
            pref([6, 5, 1, 2, 3, 0]),  # a: 5 first among unseen -> rank 0 -> 1.0
            pref([6, 5, 4, 3, 0, 1]),  # a: 5 last of {3, 4, 5, 6} -> rank 3 -> 1/log2(5) at k=10, 0 at k=3
            pref([1, 2, 3, 4, 5, 9]),  # b: item 6 is seen; 1 lowest of {1..5} -> rank 4
            pref([5, 4, 3, 2, 1, 9]),  # b: 1 first -> 1.0
            pref([3, 3, 3, 3, 3, 9]),  # b: all tie -> pessimistic rank 4 -> 1/log2(6)
        ]
    )
    expected_ranks = np.array([[2, 0, 3], [4, 0, 4]])
    np.testing.assert_array_equal(validation_ranks(model, vectors, seqs, valid), expected_ranks)
    got = rewards(model, vectors, seqs, valid, k=10)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, 1.0 / np.log2(expected_ranks + 2.0))
    # k=3: ranks 3 and 4 fall outside the top 3 and earn nothing
    np.testing.assert_allclose(rewards(model, vectors, seqs, valid, k=3), [[0.5, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # k=None: the full ranking, no cut-off; the lowest possible rank (4 of 5 unseen items) still earns
    np.testing.assert_allclose(rewards(model, vectors, seqs, valid, k=None), 1.0 / np.log2(expected_ranks + 2.0))


def test_batching_does_not_change_rewards() -> None:
    model = controlled_sasrec()
    rng = np.random.default_rng(0)
    seqs = [[1], [2, 3], [4], [5, 6, 1]]
    valid = [3, 1, 6, 2]
    vectors = rng.normal(size=(len(seqs) * 5, DIM)).astype(np.float32)  # N = 5 samples per user
    whole = rewards(model, vectors, seqs, valid, k=5, batch_size=1000)
    for batch_size in (1, 3, 7):
        np.testing.assert_array_equal(rewards(model, vectors, seqs, valid, k=5, batch_size=batch_size), whole)


def test_reward_inputs_never_use_the_test_item() -> None:
    model = controlled_sasrec()
    split = Split(users={"a": UserSplit(train=[1, 2], valid=5, test=3, train_ratings=[4.0, 3.0])}, dropped_users=0)
    seqs, valid = reward_inputs(split, ["a"])
    assert seqs == [[1, 2]] and valid == [5]
    # the test item is neither an input nor excluded: it is an ordinary unseen item at validation time
    vector = pref([6, 5, 4, 3, 2, 1])[None]
    before = rewards(model, vector, seqs, valid)
    split.users["a"].test = 4
    assert np.array_equal(rewards(model, vector, *reward_inputs(split, ["a"])), before)


def test_shape_errors_say_what_is_wrong() -> None:
    model = controlled_sasrec()
    with pytest.raises(ValueError, match="user-major"):
        rewards(model, np.zeros((5, DIM), np.float32), [[1], [2]], [3, 4])
    with pytest.raises(ValueError, match="validation items"):
        rewards(model, np.zeros((2, DIM), np.float32), [[1], [2]], [3])
    with pytest.raises(ValueError, match="knowledge-augmented"):
        rewards(model, np.zeros((2, DIM + 1), np.float32), [[1], [2]], [3, 4])
    with pytest.raises(ValueError, match="k must be"):
        rewards(model, np.zeros((2, DIM), np.float32), [[1], [2]], [3, 4], k=0)
