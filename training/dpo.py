"""LoRA fine-tuning of the LLM with TRL: DPO on preference pairs, SFT on re-rank targets.

DPO: Rafailov et al., *Direct Preference Optimization*, NeurIPS 2023, as DPO4Rec (Sun et al., arXiv
2410.05939, step 5) uses it: beta=0.01, no SFT before it, LoRA adapters. The loss is TRL's
``DPOTrainer`` (``loss_type="sigmoid"``), never hand-written here. With a PEFT model the reference policy
is the base model with the adapters disabled (no second copy in memory); ``precompute_ref_log_probs``
runs that reference pass once over the data before training, so each training step is one
forward/backward of the policy only.

SFT (the re-rank job): TRL's ``SFTTrainer`` on prompt -> the true item's label, loss on the completion
only (``completion_only_loss``).

Both take plain rows and a model folder (``llm.models.resolve_model``), and write a PEFT adapter folder
that vLLM loads with a ``LoRARequest`` (``llm.engine.make_lora``); ``llm.weights.merge_adapter`` writes a merged
full model instead, for serving without LoRA. Prompts are chat messages, so TRL applies the same chat
template as ``llm.prompts.render`` does at serving time.

TRL 1.16 notes (read from its source): ``DPOConfig`` has no ``max_prompt_length`` any more (this module
filters over-long prompts itself); its truncation keeps the start, so ``max_length`` cuts completions;
TRL defaults ``bf16=True`` and ``gradient_checkpointing=True``, both slower on a CPU without bf16 units,
so the defaults here are off.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.pairs import PairSet

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
DPO_CURVE_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
)
SFT_CURVE_KEYS = ("loss", "mean_token_accuracy", "entropy", "learning_rate", "grad_norm")
# What vLLM's CPU/GPU LoRA kernels accept for Llama/Qwen-style models; "all-linear" resolves to these.
_LORA_DEFAULT = "all-linear"


@dataclass
class LoRATrainConfig:
    """Settings shared by DPO and SFT: optimisation, LoRA, lengths. Defaults suit SmolLM2-135M on CPU."""

    learning_rate: float = 5e-5  # LoRA wants larger steps than full fine-tuning (TRL's DPO default is 1e-6)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs (smoke runs)
    batch_size: int = 4  # examples (pairs for DPO) per forward pass
    grad_accum: int = 4  # optimizer step every grad_accum batches
    warmup: float = 0.1  # < 1: fraction of the optimizer steps; >= 1: a number of steps
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    lora_r: int = 16  # must not exceed the engine's max_lora_rank (llm.engine.EngineConfig, 16)
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = _LORA_DEFAULT  # "all-linear" = every linear layer but lm_head
    max_length: int = 1024  # prompt + completion tokens; TRL cuts the completion end beyond it
    max_prompt_length: int | None = 896  # prompts longer than this are dropped (and counted), not cut
    dtype: str = "float32"  # weights while training; the adapter is saved in it, merges are cast on save
    bf16: bool = False  # bf16 autocast; only worth it with bf16 hardware (GPU, AVX512-BF16/AMX CPUs)
    gradient_checkpointing: bool = False  # saves memory, costs ~20-30 % time; a 135M model does not need it
    seed: int = 0
    logging_steps: int = 1  # optimizer steps between logged rows (the curves' resolution)
    num_threads: int = 0  # torch intra-op threads while training; 0 = leave torch's setting

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16 tokens, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be in (0, max_length={self.max_length}): "
                "the completion needs room after the prompt"
            )
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = torch's default), got {self.num_threads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if isinstance(self.lora_target_modules, (list, tuple)):
            self.lora_target_modules = list(self.lora_target_modules)  # YAML/JSON friendly

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DPOTrainConfig(LoRATrainConfig):
    beta: float = 0.01  # DPO4Rec's value; rewards/* in the logs are beta * log-ratios
    loss_type: str = "sigmoid"  # the DPO loss; any TRL DPOConfig.loss_type works
    precompute_ref_log_probs: bool = True  # one reference pass up front instead of one per step
    precompute_ref_batch_size: int | None = None  # None = batch_size

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class SFTTrainConfig(LoRATrainConfig):
    learning_rate: float = 1e-4
    max_prompt_length: int | None = 1000
    max_length: int = 1024


@dataclass
class TrainResult:
    adapter_dir: Path  # PEFT adapter (adapter_config.json + adapter_model.safetensors)
    log_history: list[dict[str, Any]]  # trainer.state.log_history, as logged
    curves: dict[str, list[float]] = field(default_factory=dict)  # "step" + one list per logged key
    examples: int = 0  # rows trained on
    dropped_long: int = 0  # rows whose prompt exceeded max_prompt_length
    setup_seconds: float = 0.0  # model load, tokenization and (DPO) the reference pass
    train_seconds: float = 0.0
    tokens: int = 0  # tokens seen in training (DPO: chosen and rejected sequences)
    tokens_per_second: float = 0.0


# ---- data ----------------------------------------------------------------------------------------------


def _answer(prompt: Any, text: str) -> Any:
    """A completion in the prompt's format: an assistant message for chat prompts, else plain text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def dpo_dataset_rows(pairs: PairSet | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """TRL preference rows {prompt, chosen, rejected}; chat prompts get conversational completions."""
    rows = pairs.rows if isinstance(pairs, PairSet) else pairs
    return [
        {
            "prompt": r["prompt"],
            "chosen": _answer(r["prompt"], r["chosen"]),
            "rejected": _answer(r["prompt"], r["rejected"]),
        }
        for r in rows
    ]


def sft_dataset_rows(examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """TRL prompt-completion rows {prompt, completion} from {prompt, completion} examples."""
    return [{"prompt": e["prompt"], "completion": _answer(e["prompt"], e["completion"])} for e in examples]


def prompt_length(tokenizer: Any, prompt: Any) -> int:
    """Tokens of a prompt as TRL tokenizes it (chat template with the generation prompt for messages)."""
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        return len(ids["input_ids"])
    return len(tokenizer(prompt)["input_ids"])


def _drop_long(rows: list[dict[str, Any]], tokenizer: Any, limit: int | None) -> tuple[list[dict[str, Any]], int]:
    if limit is None:
        return rows, 0
    kept = [r for r in rows if prompt_length(tokenizer, r["prompt"]) <= limit]
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning(
            "dropped %d of %d examples whose prompt exceeds max_prompt_length=%d tokens; show fewer "
            "history items (PromptConfig.max_history / max_recent) to keep them",
            dropped,
            len(rows),
            limit,
        )
    return kept, dropped


# ---- shared trainer plumbing ------------------------------------------------------------------------


def _load(model_dir: Path, cfg: LoRATrainConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype))
    return model, tokenizer


def _lora(cfg: LoRATrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _common_args(cfg: LoRATrainConfig, trainer_dir: Path, progress: bool) -> dict[str, Any]:
    return {
        "output_dir": str(trainer_dir),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "warmup_steps": cfg.warmup,  # transformers 5 folded warmup_ratio into warmup_steps
        "lr_scheduler_type": cfg.lr_scheduler,
        "weight_decay": cfg.weight_decay,
        "max_length": cfg.max_length,
        "bf16": cfg.bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": not progress,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,  # nothing to pin on CPU; on GPU the batches are tiny anyway
    }


def _progress_callback() -> Any:
    from transformers import TrainerCallback

    class TimeEstimate(TrainerCallback):
        """Logs step, loss, measured tokens/s and the time left at every logging step."""

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not logs or state.global_step == 0 or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.start
            left = elapsed / state.global_step * (state.max_steps - state.global_step)
            tokens = logs.get("num_tokens")
            speed = f", {tokens / elapsed:.0f} tok/s" if tokens else ""
            log.info(
                "step %d/%d loss %.4f, %.1f s/step%s, about %s left",
                state.global_step,
                state.max_steps,
                logs["loss"],
                elapsed / state.global_step,
                speed,
                _duration(left),
            )

    return TimeEstimate()


@contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _dataset_tokens(dataset: Any, dpo: bool) -> int:
    if dpo:
        return sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        )
    return sum(len(ids) for ids in dataset["input_ids"])


def _run(
    trainer: Any,
    cfg: LoRATrainConfig,
    out_dir: Path,
    setup_seconds: float,
    examples: int,
    dropped: int,
    curve_keys: Sequence[str],
    dpo: bool,
) -> TrainResult:
    per_epoch = _dataset_tokens(trainer.train_dataset, dpo)
    steps = (
        trainer.args.max_steps
        if trainer.args.max_steps > 0
        else math.ceil(cfg.epochs * math.ceil(examples / cfg.batch_size) / cfg.grad_accum)
    )
    log.info(
        "training on %d examples (%d tokens per epoch), about %d optimizer steps; setup took %s",
        examples,
        per_epoch,
        steps,
        _duration(setup_seconds),
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    adapter_dir = out_dir / ADAPTER_DIR
    # The PEFT model alone: adapter_config.json + adapter_model.safetensors (what vLLM's LoRARequest
    # reads). Not trainer.save_model, which would also drop the tokenizer into the adapter folder.
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])  # not TRL's "ref" copy
    history = list(trainer.state.log_history)
    tokens = int(max((row.get("num_tokens", 0) for row in history), default=0))
    result = TrainResult(
        adapter_dir=adapter_dir,
        log_history=history,
        curves=curves(history, curve_keys),
        examples=examples,
        dropped_long=dropped,
        setup_seconds=round(setup_seconds, 2),
        train_seconds=round(train_seconds, 2),
        tokens=tokens,
        tokens_per_second=round(tokens / train_seconds, 1) if train_seconds > 0 else 0.0,
    )
    (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out_dir / "log_history.json").write_text(json.dumps(history, indent=2))
    log.info(
        "trained in %s (%.0f tokens/s); adapter in %s", _duration(train_seconds), result.tokens_per_second, adapter_dir
    )
    return result


def curves(log_history: Sequence[Mapping[str, Any]], keys: Sequence[str] = DPO_CURVE_KEYS) -> dict[str, list[float]]:
    """Per-logging-step curves from ``trainer.state.log_history``: ``{"step": [...], key: [...]}``.

    Only the training rows (those with a ``loss``) are kept; the final summary row is skipped. A key a
    row lacks is NaN there, so every list has the same length as ``step``.
    """
    rows = [r for r in log_history if "loss" in r and "train_runtime" not in r]
    out: dict[str, list[float]] = {"step": [float(r["step"]) for r in rows]}
    for key in keys:
        out[key] = [float(r.get(key, math.nan)) for r in rows]
    return out


# ---- DPO and SFT ------------------------------------------------------------------------------------


def train_dpo(
    model_dir: str | Path,
    pairs: PairSet | Sequence[Mapping[str, Any]],
    cfg: DPOTrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    init_adapter: str | Path | None = None,
) -> TrainResult:
    """DPO with a LoRA adapter on the causal LM in ``model_dir``; the adapter goes to ``out_dir/adapter``.

    ``init_adapter``: continue training an existing adapter (the re-rank job's SFT adapter). TRL then
    keeps a frozen copy of it as the reference policy (DPO after SFT), and the result is still ONE
    adapter on the base model, servable next to the preference adapter by vLLM multi-LoRA. Its LoRA
    shape comes from the adapter, not from ``cfg``.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = _load(Path(model_dir), cfg)
    peft_config = _lora(cfg)
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_config = None  # TRL copies the loaded adapter into a frozen "ref" adapter
    rows, dropped = _drop_long(dpo_dataset_rows(pairs), tokenizer, cfg.max_prompt_length)
    if not rows:
        raise ValueError("no preference pairs to train on (all dropped or none given)")
    args = DPOConfig(
        **_common_args(cfg, out_dir / "trainer", progress),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=cfg.precompute_ref_batch_size,
    )
    try:
        with _threads(cfg.num_threads):  # the reference pass runs inside DPOTrainer.__init__
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[_progress_callback()],
            )
            return _run(
                trainer, cfg, out_dir, time.perf_counter() - start, len(rows), dropped, DPO_CURVE_KEYS, dpo=True
            )
    finally:
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)


def train_sft(
    model_dir: str | Path,
    examples: Sequence[Mapping[str, Any]],
    cfg: SFTTrainConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> TrainResult:
    """SFT with a LoRA adapter on {prompt, completion} rows, loss on the completion only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = _load(Path(model_dir), cfg)
    rows, dropped = _drop_long(sft_dataset_rows(examples), tokenizer, cfg.max_prompt_length)
    if not rows:
        raise ValueError("no SFT examples to train on (all dropped or none given)")
    args = SFTConfig(**_common_args(cfg, out_dir / "trainer", progress), completion_only_loss=True, packing=False)
    try:
        with _threads(cfg.num_threads):
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=_lora(cfg),
                callbacks=[_progress_callback()],
            )
            return _run(
                trainer, cfg, out_dir, time.perf_counter() - start, len(rows), dropped, SFT_CURVE_KEYS, dpo=False
            )
    finally:
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)
