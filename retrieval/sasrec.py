"""SASRec, optionally fused with a preference vector (the DPO4Rec knowledge-augmented retriever).

SASRec: Kang & McAuley, *Self-Attentive Sequential Recommendation*, ICDM 2018. The contract follows
RecBole's ``recbole/model/sequential_recommender/sasrec.py`` (``calculate_loss`` for training,
``full_sort_predict`` for full ranking, item 0 = padding) and its block layout (BERT-style post-LN,
GELU feed-forward, ``N(0, 0.02)`` init); ``norm_first=True`` gives the pre-LN blocks with a final
LayerNorm of SASRec.pytorch (``python/model.py``). Loss is full softmax cross-entropy over all items
at every position (RecBole's ``loss_type="CE"``).

Knowledge augmentation (DPO4Rec, Sun et al. 2024, arXiv 2410.05939): a frozen text encoder's vector of
the user's preference text goes through a small trainable adaptor MLP and is fused with the ID-based
representation: ``concat`` (concatenate with the sequence output, project back to ``hidden``),
``token`` (an extra token before the sequence that every position can attend to), ``add`` (added
to every position's input) or ``residual`` (added to every position's output through a zero-initialised
last adaptor layer, so training starts from plain SASRec and the preference only enters as far as it
lowers the loss).

Layout: sequences are **left-padded** (``[0, 0, i1, i2, ..., in]``, newest last) and positions are
counted from the right end, so a history gives the same representation at any padded length
``<= max_len`` and padding never takes part in attention.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Fusion = Literal["concat", "token", "add", "residual"]
FUSIONS: tuple[str, ...] = ("concat", "token", "add", "residual")
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
Histories = torch.Tensor | Sequence[Sequence[int]]  # a left-padded (B, L) LongTensor or raw histories
Prefs = torch.Tensor | np.ndarray | None  # (B, pref_dim) preference vectors


@dataclass
class SASRecConfig:
    num_items: int  # N; item indices are 1..N, 0 is padding (Catalog.num_embeddings == N + 1)
    max_len: int = 50  # longest history the model reads; older items are dropped
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2  # on embeddings, attention weights, residual branches and the adaptor
    inner: int | None = None  # feed-forward width; None = 4 * hidden (RecBole's inner_size=256 at 64)
    norm_first: bool = False  # False: post-LN as RecBole/BERT; True: pre-LN as SASRec.pytorch
    pref_dim: int = 0  # 0 = plain SASRec; 384 = all-MiniLM-L6-v2 preference vectors
    fusion: Fusion = "concat"  # how the adapted preference meets the sequence (ignored if pref_dim=0)
    adaptor_hidden: int = 128  # width of the adaptor MLP's hidden layer
    init_std: float = 0.02  # N(0, init_std) for Linear and Embedding weights, as RecBole

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1 (the catalog size N), got {self.num_items}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.hidden < 1 or self.layers < 1 or self.heads < 1:
            raise ValueError("hidden, layers and heads must all be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.inner is not None and self.inner < 1:
            raise ValueError(f"inner must be >= 1 or None (= 4 * hidden), got {self.inner}")
        if self.pref_dim < 0:
            raise ValueError(f"pref_dim must be 0 (no preferences) or the encoder's dim, got {self.pref_dim}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.adaptor_hidden < 1:
            raise ValueError(f"adaptor_hidden must be >= 1, got {self.adaptor_hidden}")

    @property
    def ffn_width(self) -> int:
        return self.inner if self.inner is not None else 4 * self.hidden


def pad_sequences(seqs: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Left-pad histories (oldest first) into a (B, max_len) LongTensor, keeping the newest items."""
    out = torch.zeros((len(seqs), max_len), dtype=torch.long)  # (B, L)
    for b, seq in enumerate(seqs):
        tail = list(seq)[-max_len:]
        if tail:
            out[b, max_len - len(tail) :] = torch.tensor(tail, dtype=torch.long)
    return out


class Block(nn.Module):
    """One Transformer layer: causal multi-head self-attention + GELU feed-forward."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm_first = cfg.norm_first
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn_width), nn.GELU(), nn.Linear(cfg.ffn_width, cfg.hidden))
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def attention(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=-1)  # 3 x (B, T, H)
        hs = H // self.heads
        q, k, v = (t.view(B, T, self.heads, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, H))  # (B, T, H)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.drop(self.attention(self.norm1(x), allowed))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attention(x, allowed)))
        return self.norm2(x + self.drop(self.ffn(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender over item indices 1..N, optionally preference-fused."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.item_embedding = nn.Embedding(cfg.num_items + 1, H, padding_idx=0)
        self.position_embedding = nn.Embedding(cfg.max_len, H)
        self.input_norm = nn.LayerNorm(H, eps=1e-12)
        self.input_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(H, eps=1e-12) if cfg.norm_first else nn.Identity()
        self.adaptor: nn.Module | None = None
        self.pref_token: nn.Parameter | None = None
        self.fuse_proj: nn.Linear | None = None
        if cfg.pref_dim:
            self.adaptor = nn.Sequential(
                nn.Linear(cfg.pref_dim, cfg.adaptor_hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.adaptor_hidden, H),
            )
            if cfg.fusion == "token":  # a learned "this is the preference" type embedding
                self.pref_token = nn.Parameter(torch.zeros(H))
            elif cfg.fusion == "concat":
                self.fuse_proj = nn.Linear(2 * H, H)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()  # padding scores 0 and gets no gradient
            if self.adaptor is not None and cfg.fusion == "residual":
                last = self.adaptor[-1]
                assert isinstance(last, nn.Linear)
                last.weight.zero_()  # h + adaptor(pref) == h at the start: plain SASRec

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- encoding -----------------------------------------------------------------------------------

    def _check_inputs(self, seq: torch.Tensor, pref: torch.Tensor | None) -> None:
        if seq.dim() != 2 or seq.size(1) > self.cfg.max_len:
            raise ValueError(f"seq must be (B, L) with L <= max_len={self.cfg.max_len}, got {tuple(seq.shape)}")
        if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) > self.cfg.num_items):
            raise ValueError(f"item indices must be in 0..{self.cfg.num_items} (0 = padding)")
        if self.cfg.pref_dim == 0:
            if pref is not None:
                raise ValueError("this SASRec has pref_dim=0: build it with pref_dim>0 to use preferences")
        elif pref is None:
            raise ValueError(
                f"this SASRec fuses preference vectors (pref_dim={self.cfg.pref_dim}): pass pref "
                "(B, pref_dim); pass zeros explicitly to run without a preference"
            )
        elif pref.shape != (seq.size(0), self.cfg.pref_dim):
            raise ValueError(f"pref must be ({seq.size(0)}, {self.cfg.pref_dim}), got {tuple(pref.shape)}")

    def encode(
        self, seq: torch.Tensor, pref: torch.Tensor | None = None, pref_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fused representation at every position: (B, L) [+ (B, D)] -> (B, L, H).

        ``pref_mask`` (B, L), training only: 0 where a position must not see the preference (fusions
        add, residual and concat; the token fusion has no per-position preference).
        """
        self._check_inputs(seq, pref)
        B, L = seq.shape
        positions = torch.arange(self.cfg.max_len - L, self.cfg.max_len, device=seq.device)  # (L,)
        # no sqrt(hidden) scaling of item embeddings (SASRec.pytorch has one): the LayerNorm after the
        # sum makes it irrelevant
        x = self.item_embedding(seq) + self.position_embedding(positions)  # (B, L, H)
        valid = seq > 0  # (B, L)
        adapted = self.adaptor(pref.to(x.dtype)) if self.adaptor is not None and pref is not None else None
        per_position = None  # (B, L, H) the adapted preference as each position sees it
        if adapted is not None:
            per_position = adapted[:, None, :].expand(-1, L, -1)
            if pref_mask is not None:
                per_position = per_position * pref_mask[..., None].to(x.dtype)
        if per_position is not None and self.cfg.fusion == "add":
            x = x + per_position  # (B, L, H)
        if adapted is not None and self.pref_token is not None:  # token: prepend, attended by all
            x = torch.cat([(adapted + self.pref_token)[:, None, :], x], dim=1)  # (B, 1+L, H)
            valid = torch.cat([valid.new_ones((B, 1)), valid], dim=1)  # (B, 1+L)
        x = self.input_drop(self.input_norm(x))
        T = x.size(1)
        causal = torch.ones((T, T), dtype=torch.bool, device=seq.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)  # a padded query attends to itself only
        allowed = (causal & (valid[:, None, :] | eye))[:, None]  # (B, 1, T, T), True = may attend
        for block in self.blocks:
            x = block(x, allowed)
        h = self.final_norm(x)[:, T - L :]  # (B, L, H), the preference token dropped
        if per_position is not None and self.fuse_proj is not None:
            h = self.fuse_proj(torch.cat([h, per_position], dim=-1))  # (B, L, H)
        if per_position is not None and self.cfg.fusion == "residual":
            h = h + per_position  # (B, L, H)
        return h

    def forward(self, seq: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
        """User representation at the last (newest) position: (B, L) -> (B, H)."""
        return self.encode(seq, pref)[:, -1]

    # ---- training -----------------------------------------------------------------------------------

    def calculate_loss(
        self,
        seq: torch.Tensor,
        pos: torch.Tensor,
        pref: torch.Tensor | None = None,
        pref_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of the next item over all items, at every non-padding target.

        seq: (B, L) inputs; pos: (B, L) next item at each position, 0 where there is none;
        pref_mask: (B, L), 0 where that position trains without the preference (see ``encode``).
        """
        h = self.encode(seq, pref, pref_mask)  # (B, L, H)
        keep = pos > 0  # (B, L)
        logits = h[keep] @ self.item_embedding.weight.T  # (M, N+1)
        logits[:, 0] = float("-inf")  # padding is never a candidate
        return F.cross_entropy(logits, pos[keep])

    # ---- inference (always eval mode, no grad) ------------------------------------------------------

    def _prepare(self, seqs: Histories, prefs: Prefs) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.item_embedding.weight.device
        seq = seqs if isinstance(seqs, torch.Tensor) else pad_sequences(seqs, self.cfg.max_len)
        pref = torch.as_tensor(prefs, dtype=torch.float32) if prefs is not None else None
        return seq.to(device), pref.to(device) if pref is not None else None

    def _infer(self, seqs: Histories, prefs: Prefs) -> torch.Tensor:
        seq, pref = self._prepare(seqs, prefs)
        was_training = self.training
        if was_training:  # a served model stays in eval mode: eval() and back walk every module (~0.25 ms)
            self.eval()
        try:
            with torch.no_grad():
                return self.forward(seq, pref)  # (B, H)
        finally:
            if was_training:
                self.train()

    def full_sort_predict(self, seq: Histories, pref: Prefs = None) -> torch.Tensor:
        """Scores of every item (B, N+1), inner products with the item embeddings (column 0 = padding)."""
        return self._infer(seq, pref) @ self.item_embedding.weight.detach().T  # (B, N+1)

    def user_vectors(self, seq: Histories, pref: Prefs = None) -> np.ndarray:
        """Query vectors (B, H) float32 for an inner-product index over :meth:`item_vectors`."""
        return self._infer(seq, pref).cpu().numpy().astype(np.float32)

    def item_vectors(self) -> np.ndarray:
        """Item embeddings (N+1, H) float32; row 0 is padding (all zeros)."""
        return self.item_embedding.weight.detach().cpu().numpy().astype(np.float32)

    def with_items(self, vectors: np.ndarray) -> SASRec:
        """A copy that knows M more items (indices N+1..N+M) whose embeddings are ``vectors`` (M, H), e.g. the
        content tower's: they are scored, retrieved and read in histories like trained items."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.cfg.hidden:
            raise ValueError(f"new item vectors must be (M, {self.cfg.hidden}), got {vectors.shape}")
        grown = SASRec(replace(self.cfg, num_items=self.cfg.num_items + len(vectors)))
        state = self.state_dict()
        old = state["item_embedding.weight"]  # (N+1, H)
        state["item_embedding.weight"] = torch.cat([old, torch.from_numpy(vectors).to(old)])  # (N+M+1, H)
        grown.load_state_dict(state)
        return grown.to(old.device).eval()

    # ---- persistence --------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``model.pt`` (state_dict) and ``config.json`` into ``directory`` (created if needed)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, path / WEIGHTS_FILE)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> SASRec:
        """Rebuild a model saved by :meth:`save`, in eval mode."""
        path = Path(directory)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing: point to a directory written by SASRec.save")
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        try:
            cfg = SASRecConfig(**raw)
        except TypeError as e:
            raise ValueError(f"{path / CONFIG_FILE} is not a SASRecConfig: {e}") from e
        model = cls(cfg)
        state = torch.load(path / WEIGHTS_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state)
        return model.to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
