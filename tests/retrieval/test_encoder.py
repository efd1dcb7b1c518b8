"""TextEncoder on the packaged all-MiniLM-L6-v2 (real model, loaded once per module)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.encoder import EncoderConfig, TextEncoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(EncoderConfig(batch_size=4))


def test_vectors_are_384_d_float32_and_unit_length(encoder):
    texts = [f"The user enjoys {g} films from the 1990s." for g in ("comedy", "horror", "drama", "war", "musical")]
    vectors = encoder.encode(texts)
    assert encoder.dim == 384
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similar_texts_are_closer_than_dissimilar_ones(encoder):
    a, b, c = encoder.encode(
        [
            "Loves science fiction movies about space travel and aliens.",
            "Enjoys sci-fi films set in outer space with extraterrestrials.",
            "Prefers quiet romantic period dramas about family life.",
        ]
    )
    assert a @ b > a @ c + 0.2 and a @ b > b @ c + 0.2


def test_order_and_batching_do_not_change_vectors(encoder):
    texts = ["short", "a somewhat longer preference text about westerns", "noir", "cartoons for kids", "jazz"]
    forward = encoder.encode(texts)
    backward = encoder.encode(texts[::-1])[::-1]
    np.testing.assert_allclose(forward, backward, atol=1e-5)


def test_empty_and_wrong_inputs(encoder):
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("one string")  # type: ignore[arg-type]


def test_config_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="sentence-transformers model folder"):
        EncoderConfig(model_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="batch_size"):
        EncoderConfig(batch_size=0)
