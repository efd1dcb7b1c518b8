"""Model weights the engines load: a LoRA adapter merged into its base model, cached by content.

vLLM's CPU LoRA path gathers the adapter per token and is about 10x slower at prefill than the same
weights merged (docs/BENCHMARKS.md), so the training engines and, by default, the service load merged
folders. A merged folder is a plain Hugging Face model (weights + tokenizer), written to a temporary
folder and renamed into place, so a crash never leaves half a model where a reader looks.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """A full model folder (weights + tokenizer) with the LoRA adapter merged in, for vLLM without LoRA.

    Merged in float32, saved in ``dtype``; written to a temp folder and renamed into place.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; merge into a new folder")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        staged = Path(tmp) / "model"
        staged.mkdir()
        for item in list(Path(tmp).iterdir()):
            if item != staged:
                item.rename(staged / item.name)
        staged.rename(out_dir)
    log.info("merged %s into %s -> %s", adapter_dir, model_dir, out_dir)
    return out_dir


def adapter_digest(adapter_dir: str | Path) -> str:
    """sha256 over an adapter folder's file names and contents (what a merged copy is keyed by)."""
    digest = hashlib.sha256()
    root = Path(adapter_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def merged_model(model_dir: str | Path, adapter_dir: str | Path, cache_dir: str | Path, dtype: str = "float32") -> Path:
    """``model_dir`` with ``adapter_dir`` merged in, under ``cache_dir``; made once per adapter content.

    Keyed by the base folder's name, the adapter's digest and ``dtype``: a retrained adapter gets a new
    folder, a restart reuses the old one. Two processes merging at once both succeed (the second
    finds the first's folder)."""
    key = f"{Path(model_dir).name}-{adapter_digest(adapter_dir)[:16]}-{dtype}"
    out = Path(cache_dir).expanduser() / "merged" / key
    if out.is_dir():
        return out
    try:
        return merge_adapter(model_dir, adapter_dir, out, dtype=dtype)
    except (FileExistsError, OSError):
        if out.is_dir():  # another process renamed its copy into place first
            return out
        raise
