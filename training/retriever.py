"""Training and evaluation of the (optionally preference-fused) SASRec retriever.

Follows RecBole's sequential-recommendation trainer with ``loss_type="CE"`` (full softmax over all items
at every position, which covers every prefix of a window without explicit augmentation), Adam, and early
stopping on validation NDCG@10 under full ranking (RecBole ``valid_metric: NDCG@10``, ``stopping_step``).
The best validation state is kept, as in RecBole's ``_save_checkpoint`` on improvement.

Inputs are plain dictionaries keyed by user id: training items in time order, the validation item, and
(for DPO4Rec's knowledge-augmented variant) a preference vector per user.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.sasrec import SASRec, SASRecConfig, pad_sequences
from training import ranking_metrics as M

logger = logging.getLogger(__name__)

U = TypeVar("U", bound=Hashable)  # user id type (str in the pipeline, anything hashable here)


@dataclass
class RetrieverTrainConfig:
    epochs: int = 200  # upper bound; early stopping usually ends well before
    batch_size: int = 128  # users (windows) per step
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    patience: int = 10  # evaluations without a validation NDCG@10 gain before stopping
    eval_every: int = 1  # epochs between validations
    seed: int = 0
    max_len: int | None = None  # training window; None = the model's max_len (must not exceed it)
    windows: Literal["last", "all"] = "last"  # "all" also trains on older max_len-long windows
    device: str = "cpu"
    num_threads: int = 0  # torch intra-op threads while training; 0 = leave torch's setting
    eval_batch_size: int = 512  # users per scoring batch

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None (= the model's), got {self.max_len}")
        if self.windows not in ("last", "all"):
            raise ValueError(f"windows must be 'last' or 'all', got {self.windows!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = torch's default), got {self.num_threads}")


def make_windows(seq: Sequence[int], max_len: int, all_windows: bool) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs: the last ``max_len + 1`` items shifted by one, and with ``all_windows``
    also the older windows (stride ``max_len``), so every item but the first is a target exactly once."""
    out = []
    end = len(seq)
    while end >= 2:
        window = list(seq[max(0, end - max_len - 1) : end])
        out.append((window[:-1], window[1:]))
        if not all_windows:
            break
        end -= max_len
    return out


def _check_prefs(model_cfg: SASRecConfig, prefs: Mapping[U, np.ndarray] | None, users: Sequence[U]) -> None:
    if model_cfg.pref_dim == 0:
        if prefs is not None:
            raise ValueError("prefs were given but model_cfg.pref_dim == 0: set pref_dim to the vector size")
        return
    if prefs is None:
        raise ValueError(f"model_cfg.pref_dim={model_cfg.pref_dim} needs prefs (a vector per user)")
    missing = [u for u in users if u not in prefs]
    if missing:
        raise ValueError(f"{len(missing)} users have no preference vector, e.g. {missing[:5]}")
    bad = [u for u in users if np.shape(prefs[u]) != (model_cfg.pref_dim,)]
    if bad:
        raise ValueError(
            f"preference vectors must have shape ({model_cfg.pref_dim},); user {bad[0]!r} has {np.shape(prefs[bad[0]])}"
        )


def _pref_matrix(prefs: Mapping[U, np.ndarray] | None, users: Sequence[U]) -> torch.Tensor | None:
    if prefs is None:
        return None
    return torch.from_numpy(np.stack([np.asarray(prefs[u], dtype=np.float32) for u in users]))  # (U, D)


def score_users(
    model: SASRec,
    seqs: Mapping[U, Sequence[int]],
    prefs: Mapping[U, np.ndarray] | None,
    users: Sequence[U],
    batch_size: int = 512,
) -> np.ndarray:
    """Scores of every item (U, N+1) float32 for ``users`` given their histories ``seqs[u]``.

    Column 0 is padding; nothing is excluded here (pass the seen items to ``ranks_of_targets``).
    """
    _check_prefs(model.cfg, prefs, users)
    out = np.empty((len(users), model.cfg.num_items + 1), dtype=np.float32)  # (U, N+1)
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        pref = _pref_matrix(prefs, chunk)
        scores = model.full_sort_predict([seqs[u] for u in chunk], pref)  # (b, N+1)
        out[start : start + len(chunk)] = scores.cpu().numpy()
    return out


def rank_targets(
    model: SASRec,
    seqs: Mapping[U, Sequence[int]],
    targets: Mapping[U, int],
    prefs: Mapping[U, np.ndarray] | None,
    users: Sequence[U],
    batch_size: int = 512,
) -> np.ndarray:
    """0-based full-ranking rank (U,) of ``targets[u]``, excluding the items of the history ``seqs[u]``."""
    ranks = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), batch_size):  # batched so (U, N+1) never sits in memory at once
        chunk = users[start : start + batch_size]
        scores = score_users(model, seqs, prefs, chunk, batch_size)  # (b, N+1)
        target = np.array([targets[u] for u in chunk], dtype=np.int64)
        ranks[start : start + len(chunk)] = M.ranks_of_targets(scores, target, [seqs[u] for u in chunk])
    return ranks


def _training_tensors(
    train_seqs: Mapping[U, Sequence[int]],
    prefs: Mapping[U, np.ndarray] | None,
    max_len: int,
    all_windows: bool,
    described: Mapping[U, Collection[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inputs, targets (S, L), preference rows (S, D) and, with ``described``, the preference mask (S, L):
    0 where the target is an item the user's preference text was written from."""
    owners: list[U] = []
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    for user, seq in train_seqs.items():
        for x, y in make_windows(seq, max_len, all_windows):
            owners.append(user)
            inputs.append(x)
            targets.append(y)
    if not inputs:
        raise ValueError("no training sequence has 2 or more items: nothing to learn from")
    pos = pad_sequences(targets, max_len)
    mask = None
    if described is not None and prefs is not None:
        mask = torch.ones_like(pos, dtype=torch.float32)  # (S, L)
        for row, user in enumerate(owners):
            hidden = set(described.get(user, ()))
            for col, item in enumerate(pos[row].tolist()):
                if item in hidden:
                    mask[row, col] = 0.0
    return pad_sequences(inputs, max_len), pos, _pref_matrix(prefs, owners), mask


def train_retriever(
    cfg: RetrieverTrainConfig,
    model_cfg: SASRecConfig,
    train_seqs: Mapping[U, Sequence[int]],
    valid: Mapping[U, int],
    prefs: Mapping[U, np.ndarray] | None = None,
    progress: bool = True,
    described: Mapping[U, Collection[int]] | None = None,
) -> tuple[SASRec, list[dict[str, Any]]]:
    """Train SASRec on ``train_seqs``; early-stop on validation NDCG@10; return the best model (eval mode)
    and the history (one dict per validation: epoch, loss, seconds and every metric of ``summarize``).

    ``described[u]``: the items user u's preference text was written from. A position whose target is
    one of them trains without the preference: the text names that very item, which a live request's
    next item never is (seen items are not recommended), so the model would learn to follow the text
    to items it can never recommend."""
    max_len = cfg.max_len or model_cfg.max_len
    if max_len > model_cfg.max_len:
        raise ValueError(f"training max_len {max_len} exceeds the model's max_len {model_cfg.max_len}")
    users = list(train_seqs)
    _check_prefs(model_cfg, prefs, users)
    val_users = [u for u in users if u in valid]
    if not val_users:
        raise ValueError("no user of train_seqs has a validation item: early stopping needs valid")
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        device = torch.device(cfg.device)
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):  # seeding here leaves the caller's RNG alone
            torch.manual_seed(cfg.seed)
            return _fit(cfg, model_cfg, train_seqs, valid, prefs, val_users, max_len, progress, described)
    finally:
        torch.set_num_threads(old_threads)


def _fit(
    cfg: RetrieverTrainConfig,
    model_cfg: SASRecConfig,
    train_seqs: Mapping[U, Sequence[int]],
    valid: Mapping[U, int],
    prefs: Mapping[U, np.ndarray] | None,
    val_users: list[U],
    max_len: int,
    progress: bool,
    described: Mapping[U, Collection[int]] | None = None,
) -> tuple[SASRec, list[dict[str, Any]]]:
    device = torch.device(cfg.device)
    model = SASRec(model_cfg).to(device)
    inputs, targets, pref, pref_mask = _training_tensors(  # (S, L), (S, L), (S, D), (S, L)
        train_seqs, prefs, max_len, cfg.windows == "all", described
    )
    shuffle = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    best_ndcg, best_state, best_epoch, stale = -1.0, copy.deepcopy(model.state_dict()), 0, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="SASRec", unit="epoch", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        total, steps = 0.0, 0
        for batch in torch.randperm(len(inputs), generator=shuffle).split(cfg.batch_size):
            seq, pos = inputs[batch].to(device), targets[batch].to(device)  # (b, L), (b, L)
            p = pref[batch].to(device) if pref is not None else None  # (b, D)
            m = pref_mask[batch].to(device) if pref_mask is not None else None  # (b, L)
            loss = model.calculate_loss(seq, pos, p, m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        if epoch % cfg.eval_every and epoch != cfg.epochs:
            continue
        ranks = rank_targets(model, train_seqs, valid, prefs, val_users, cfg.eval_batch_size)
        row: dict[str, Any] = {"epoch": epoch, "loss": total / steps, **M.summarize(ranks)}
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", ndcg10=f"{row['NDCG@10']:.4f}")
        logger.debug("epoch %d loss %.4f val NDCG@10 %.4f", epoch, row["loss"], row["NDCG@10"])
        if row["NDCG@10"] > best_ndcg:
            best_ndcg, best_epoch, stale = row["NDCG@10"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    logger.info("SASRec: best validation NDCG@10 %.4f at epoch %d of %d", best_ndcg, best_epoch, epoch)
    return model.eval(), history
