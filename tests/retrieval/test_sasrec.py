"""SASRec: shapes per fusion, causality, padding, inference contract, persistence, a few training steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.sasrec import SASRec, SASRecConfig, pad_sequences

N, L, D = 30, 10, 8
VARIANTS = [(0, "concat"), (D, "concat"), (D, "token"), (D, "add"), (D, "residual")]
IDS = ["plain", "concat", "token", "add", "residual"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(pref_dim: int, fusion: str, **kw) -> SASRec:
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=N, max_len=L, hidden=16, heads=2, pref_dim=pref_dim, fusion=fusion, **kw)
    return SASRec(cfg)


def batch(pref_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    seq = pad_sequences([[1, 2, 3], list(range(5, 20)), [7]], L)  # (3, L), the second one truncated
    pref = torch.randn(3, pref_dim, generator=torch.Generator().manual_seed(1)) if pref_dim else None
    return seq, pref


def test_pad_sequences_left_pads_and_keeps_newest():
    out = pad_sequences([[1, 2], list(range(1, 15)), []], 5)
    assert out.tolist() == [[0, 0, 0, 1, 2], [10, 11, 12, 13, 14], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize(("pref_dim", "fusion"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_shapes_and_inference_contract(pref_dim, fusion, norm_first):
    model = make(pref_dim, fusion, norm_first=norm_first)
    seq, pref = batch(pref_dim)
    assert model(seq, pref).shape == (3, 16)
    assert model.encode(seq, pref).shape == (3, L, 16)
    scores = model.full_sort_predict(seq, pref)
    assert scores.shape == (3, N + 1) and torch.isfinite(scores).all()
    items = model.item_vectors()
    assert items.shape == (N + 1, 16) and items.dtype == np.float32 and not items[0].any()
    users = model.user_vectors(seq, pref)
    assert users.shape == (3, 16) and users.dtype == np.float32
    np.testing.assert_allclose(users @ items.T, scores.numpy(), rtol=1e-5, atol=1e-5)  # = FAISS inner product


@pytest.mark.parametrize(("pref_dim", "fusion"), VARIANTS, ids=IDS)
def test_causal_a_later_item_never_changes_an_earlier_position(pref_dim, fusion):
    model = make(pref_dim, fusion).eval()
    seq, pref = batch(pref_dim)
    changed = seq.clone()
    changed[:, -1] = torch.tensor([9, 29, 4])
    with torch.no_grad():
        a, b = model.encode(seq, pref), model.encode(changed, pref)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize(("pref_dim", "fusion"), VARIANTS, ids=IDS)
def test_padding_length_and_input_form_do_not_matter(pref_dim, fusion):
    model = make(pref_dim, fusion)
    histories = [[1, 2, 3], [4, 5, 6, 7]]
    pref = torch.randn(2, pref_dim) if pref_dim else None
    full = model.user_vectors(pad_sequences(histories, L), pref)
    short = model.user_vectors(pad_sequences(histories, 4), pref)
    raw = model.user_vectors(histories, pref.numpy() if pref is not None else None)
    np.testing.assert_allclose(full, short, atol=1e-5)
    np.testing.assert_allclose(full, raw, atol=1e-6)


def test_inference_is_deterministic_and_restores_training_mode():
    model = make(D, "token", dropout=0.5).train()
    seq, pref = batch(D)
    first, second = model.full_sort_predict(seq, pref), model.full_sort_predict(seq, pref)
    torch.testing.assert_close(first, second)
    assert model.training and not first.requires_grad


def test_preference_argument_is_checked():
    seq, pref = batch(D)
    with pytest.raises(ValueError, match="pref_dim=0"):
        make(0, "concat")(seq, pref)
    with pytest.raises(ValueError, match="pass zeros explicitly"):
        make(D, "concat")(seq, None)
    with pytest.raises(ValueError, match=r"pref must be \(3, 8\)"):
        make(D, "concat")(seq, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="item indices"):
        make(0, "concat")(torch.tensor([[0, N + 1]]))
    with pytest.raises(ValueError, match="max_len"):
        make(0, "concat")(torch.ones((1, L + 1), dtype=torch.long))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_items": 0}, "num_items"),
        ({"hidden": 30, "heads": 4}, "divisible"),
        ({"dropout": 1.0}, "dropout"),
        ({"fusion": "sum"}, "fusion"),
        ({"pref_dim": -1}, "pref_dim"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        SASRecConfig(**{"num_items": N, **kw})


@pytest.mark.parametrize(("pref_dim", "fusion"), [(0, "concat"), (D, "token")], ids=["plain", "token"])
def test_save_load_round_trip(tmp_path, pref_dim, fusion):
    model = make(pref_dim, fusion)
    seq, pref = batch(pref_dim)
    model.save(tmp_path / "retriever")
    assert json.loads((tmp_path / "retriever" / "config.json").read_text())["fusion"] == fusion
    loaded = SASRec.load(tmp_path / "retriever")
    assert loaded.cfg == model.cfg and not loaded.training
    torch.testing.assert_close(loaded.full_sort_predict(seq, pref), model.full_sort_predict(seq, pref), rtol=0, atol=0)


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        SASRec.load(tmp_path)


@pytest.mark.parametrize(("pref_dim", "fusion"), VARIANTS, ids=IDS)
def test_loss_decreases_and_padding_gets_no_gradient(pref_dim, fusion):
    model = make(pref_dim, fusion, dropout=0.0)
    seq, pref = batch(pref_dim)
    inputs, targets = seq[:, :-1], seq[:, 1:]  # next-item targets, 0 where the input is padding
    targets = torch.where(inputs > 0, targets, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.calculate_loss(inputs, targets, pref)
        optimizer.zero_grad()
        loss.backward()
        assert not model.item_embedding.weight.grad[0].any()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_residual_fusion_starts_as_plain_sasrec_and_learns_from_the_preference():
    plain, fused = make(0, "concat"), make(D, "residual")
    missing, unexpected = fused.load_state_dict(plain.state_dict(), strict=False)  # the shared weights
    assert not unexpected and all(k.startswith("adaptor.") for k in missing)
    seq, pref = batch(D)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(seq), fused.eval()(seq, pref))
    target = torch.tensor([[0] * (L - 1) + [4]] * 3)
    fused.train()
    fused.calculate_loss(seq, target, pref).backward()
    assert fused.adaptor[-1].weight.grad.abs().sum() > 0  # the zero layer gets a gradient
