"""The recommender-feedback reward of DPO4Rec (Sun et al., arXiv 2410.05939, step 3).

The reward of one preference text for one user is the ranking quality that the knowledge-augmented
SASRec reaches for that user's held-out **validation** item when it is given the text's encoder vector:
NDCG@k under full ranking, with the user's training sequence as input and the training items excluded
from the ranking (as ``training.ranking_metrics`` does for validation). The test item is never an input here:
:func:`reward_inputs` reads only ``train`` and ``valid`` from the split.

Everything is vectorised: the U users x N sampled texts become U*N rows (user-major: row ``u*N + j`` is
sample ``j`` of user ``u``), scored by batched SASRec forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from retrieval.sasrec import SASRec, pad_sequences
from training import ranking_metrics as M
from training.split import Split


def reward_inputs(split: Split, users: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """What the reward may see for ``users``: training sequences and validation items (never test)."""
    seqs = [list(split.users[u].train) for u in users]
    valid = [int(split.users[u].valid) for u in users]
    return seqs, valid


def validation_ranks(
    model: SASRec,
    encoder_vectors: np.ndarray,
    user_seqs: Sequence[Sequence[int]],
    valid_items: Sequence[int],
    batch_size: int = 512,
) -> np.ndarray:
    """0-based rank (U, N) of each user's validation item for each of their N preference vectors.

    encoder_vectors: (U*N, D), user-major; user_seqs[u]: training items in time order (input, and
    excluded from the ranking); valid_items[u]: the target. Ties count against the target
    (``metrics.ranks_of_targets``), so a text that makes the recommender constant earns nothing.
    """
    vectors = np.asarray(encoder_vectors, dtype=np.float32)
    n_users = len(user_seqs)
    if len(valid_items) != n_users:
        raise ValueError(f"got {n_users} user sequences but {len(valid_items)} validation items")
    if n_users == 0:
        raise ValueError("rewards need at least one user")
    if vectors.ndim != 2 or vectors.shape[0] % n_users:
        raise ValueError(
            f"encoder_vectors must be (U*N, D) with U={n_users} users, user-major; got shape {vectors.shape}"
        )
    if model.cfg.pref_dim != vectors.shape[1]:
        raise ValueError(
            f"the SASRec fuses {model.cfg.pref_dim}-d preference vectors but the texts are {vectors.shape[1]}-d; "
            "the reward model must be the knowledge-augmented SASRec trained with this encoder"
        )
    n_samples = vectors.shape[0] // n_users
    padded = pad_sequences(user_seqs, model.cfg.max_len)  # (U, L), encoded once per user
    targets = np.repeat(np.asarray(valid_items, dtype=np.int64), n_samples)  # (U*N,)
    ranks = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), batch_size):
        rows = np.arange(start, min(start + batch_size, len(vectors)))
        owners = rows // n_samples  # (b,) the user of each row
        seq = padded[torch.from_numpy(owners)]  # (b, L)
        scores = model.full_sort_predict(seq, vectors[rows]).cpu().numpy()  # (b, N_items+1)
        ranks[rows] = M.ranks_of_targets(scores, targets[rows], [user_seqs[u] for u in owners])
    return ranks.reshape(n_users, n_samples)


def rewards(
    model: SASRec,
    encoder_vectors: np.ndarray,
    user_seqs: Sequence[Sequence[int]],
    valid_items: Sequence[int],
    k: int | None = 10,
    batch_size: int = 512,
) -> np.ndarray:
    """NDCG@k (U, N) float64 of each user's validation item under each of their N preference texts;
    ``k=None``: over the full ranking, ``1 / log2(rank + 2)`` for every rank.

    See :func:`validation_ranks` for the inputs; :func:`reward_inputs` builds them from a split.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None (full ranking), got {k}")
    ranks = validation_ranks(model, encoder_vectors, user_seqs, valid_items, batch_size)  # (U, N)
    k = model.cfg.num_items if k is None else k  # no rank reaches num_items: nothing is cut
    return M.per_user(ranks.ravel(), ks=(k,))[f"NDCG@{k}"].reshape(ranks.shape)
