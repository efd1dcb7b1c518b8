"""``llm.json``: which model, which adapters, the prompt and generation settings training used, and how
label log-probabilities become served scores. Written from ``LLMSpec`` (``write_llm_spec``) and read back
into it (``load_llm_spec``): one dataclass, so a field cannot be written one way and read another."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llm.engine import GenerationConfig
from llm.prompts import PromptConfig
from llm.scoring import ScoringSpec
from rundir.manifest import RunDirError

log = logging.getLogger(__name__)

LLM_JSON = "llm.json"
DEFAULT_RERANK_K = 20
JOBS = ("preference", "rerank")


def read_json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{root / name} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class LLMSpec:
    """``llm.json``: which model, which adapters, and the prompt/generation settings training used."""

    base_model: str  # "smollm2-135m-instruct" or a model folder (absolute, or resolved against the run)
    adapters: dict[str, Path | None]  # job ("preference" | "rerank") -> adapter folder
    prompt: PromptConfig
    rerank_k: int
    preference_generation: GenerationConfig
    scoring: ScoringSpec = ScoringSpec()  # "scoring": prior, fusion weight, orders; absent (older runs): LLM only

    def to_json(self, root: Path) -> dict[str, Any]:
        """The ``llm.json`` object for a run at ``root`` (adapter folders relative to it)."""
        return {
            "base_model": self.base_model,
            "adapters": {
                job: None if (path := self.adapters.get(job)) is None else str(Path(path).relative_to(root))
                for job in JOBS
            },
            "prompt": asdict(self.prompt),
            "rerank_k": self.rerank_k,
            "scoring": asdict(self.scoring),
            "preference_generation": asdict(self.preference_generation),
        }


def write_llm_spec(root: Path, spec: LLMSpec) -> None:
    (Path(root) / LLM_JSON).write_text(json.dumps(spec.to_json(Path(root)), indent=2))


def _known_fields(cls: type, raw: dict[str, Any], where: str, ignored: list[str]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        ignored.extend(f"{where}.{k}" for k in unknown)
        log.warning("llm.json: ignoring unknown %s fields %s", where, unknown)
    return {k: v for k, v in raw.items() if k in names}


def load_llm_spec(root: Path, ignored: list[str]) -> LLMSpec:
    raw = read_json(root, LLM_JSON)
    if not isinstance(raw, dict) or not raw.get("base_model"):
        raise RunDirError(f"{root / 'llm.json'} needs a base_model (a model name or folder)")
    base = str(raw["base_model"])
    if not Path(base).is_absolute() and (root / base).is_dir():
        base = str((root / base).resolve())
    adapters: dict[str, Path | None] = {}
    for job in JOBS:
        rel = (raw.get("adapters") or {}).get(job)
        if rel is not None:
            path = (root / rel).resolve()
            if not path.is_dir():
                raise RunDirError(f"{root / 'llm.json'}: adapters.{job} folder {rel!r} is missing in the run")
            adapters[job] = path
        else:
            adapters[job] = None
    try:
        saved = {"natural_titles": False, **(raw.get("prompt") or {})}  # older runs: catalogue-order titles
        prompt = PromptConfig(**_known_fields(PromptConfig, saved, "prompt", ignored))
        gen = GenerationConfig(
            **_known_fields(GenerationConfig, raw.get("preference_generation") or {}, "preference_generation", ignored)
        )
        scoring = ScoringSpec(**_known_fields(ScoringSpec, raw.get("scoring") or {}, "scoring", ignored))
    except (TypeError, ValueError) as e:
        raise RunDirError(f"{root / 'llm.json'}: {e}") from None
    rerank_k = int(raw.get("rerank_k") or DEFAULT_RERANK_K)
    if scoring.log_prior is not None and len(scoring.log_prior) < rerank_k:
        raise RunDirError(
            f"{root / 'llm.json'}: scoring.log_prior has {len(scoring.log_prior)} labels, rerank_k is {rerank_k}"
        )
    return LLMSpec(
        base_model=base,
        adapters=adapters,
        prompt=prompt,
        rerank_k=rerank_k,
        preference_generation=gen,
        scoring=scoring,
    )
