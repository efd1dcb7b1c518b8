"""Configuration of the offline pipeline: dataclasses loaded from YAML, flags override.

Follows TRL's habit: settings are dataclasses with help in comments, validated in ``__post_init__``;
``training/configs/<name>.yaml`` holds named configurations (``default``, ``tiny``, ...); the resolved
configuration is stored in the run's manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataSection:
    name: str = "ml-100k"  # "ml-100k" (fetched from PyPI) or a folder of RecBole / MovieLens files
    data_dir: str = "data"  # where fetched data sets are cached
    min_interactions: int = 5  # leave-one-out needs train + valid + test

    def __post_init__(self) -> None:
        if self.min_interactions < 3:
            raise ValueError("data.min_interactions must be >= 3 (train, valid and test items)")


@dataclass
class LLMSection:
    model: str = "smollm2-135m-instruct"  # default embedded model, or a local Hugging Face folder
    model_cache: str = "~/.cache/dpo4rec/models"  # converted models live here
    max_model_len: int = 2048
    max_num_seqs: int = 64  # vLLM batch width; prefill is compute-bound on CPU
    max_tokens: int = 96  # preference text length budget (~70 words)
    temperature: float = 0.0  # greedy for the one preference per user of the pipeline
    history_items: int = 20  # most recent training items in the preference prompt (~600 tokens)
    repetition_penalty: float = 1.1  # a 135M model loops under greedy decoding without it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError("llm.max_tokens must be >= 8; a preference needs some words")


@dataclass
class RetrieverSection:
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50  # items of history the model sees
    fusion: str = "concat"  # how the preference vector joins: concat | token | add
    adaptor_hidden: int = 128
    epochs: int = 200
    patience: int = 10  # epochs without validation NDCG@10 gain before stopping
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    windows: str = "all"  # "all": every 50-item chunk of a history trains; "last": only the newest (2.5x faster)
    num_threads: int = 1  # torch threads; 2 was slower than 1 on this 2-core machine under load
    seed: int = 0

    def __post_init__(self) -> None:
        if self.windows not in ("all", "last"):
            raise ValueError(f"retriever.windows must be all or last, not {self.windows!r}")
        if self.fusion not in ("concat", "token", "add"):
            raise ValueError(f"retriever.fusion must be concat, token or add, not {self.fusion!r}")


@dataclass
class EvalSection:
    bootstrap: int = 2000  # resamples for confidence intervals on differences
    index_kind: str = "auto"  # FAISS index: auto | flat | hnsw


@dataclass
class PipelineConfig:
    data: DataSection = field(default_factory=DataSection)
    llm: LLMSection = field(default_factory=LLMSection)
    retriever: RetrieverSection = field(default_factory=RetrieverSection)
    eval: EvalSection = field(default_factory=EvalSection)
    max_users: int | None = None  # evaluate/train on the first N users only (smoke runs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(section_type: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(section_type)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    return section_type(**values)


def from_dict(raw: dict[str, Any], where: str = "config") -> PipelineConfig:
    sections = {"data": DataSection, "llm": LLMSection, "retriever": RetrieverSection, "eval": EvalSection}
    unknown = set(raw) - set(sections) - {"max_users"}
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {sorted(unknown)}; known: {sorted(sections)} and max_users")
    kwargs: dict[str, Any] = {k: _merge(t, raw.get(k) or {}, f"{where}:{k}") for k, t in sections.items()}
    return PipelineConfig(**kwargs, max_users=raw.get("max_users"))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """A named config (``training/configs/NAME.yaml``) or a YAML path, then ``section.key=value`` overrides."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"no config {name_or_path!r}: not a file, and not one of {known}")
    raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(raw, where=str(path))
