"""The base preference row (DPO4Rec step 1): each user's history -> a free-text preference -> a vector.

The prompt sees only the training part of a user's history (never the validation or test item), so the
texts can feed both the validation reward and the test metrics without a leak. Three sources
(``llm.preference_source``, ``llm.preferences_from``): the base LLM (one greedy text per user, through
vLLM in a spawned process; with the DPO loop on, round 1's N samples per DPO user come from the same
engine, one start less), an earlier training run's texts, or the history lines themselves (the no-LLM
control). One code path per source.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llm.prompts import Message, PromptConfig, history_text, preference_messages, render
from retrieval.catalog import Catalog
from rundir.items import prompt_items
from rundir.manifest import RunDirError, read_manifest
from rundir.preferences import TEXTS, load_preferences
from training.config import PipelineConfig
from training.engines import EngineJob, EngineWeights, engine_cfg, engine_jobs, greedy, run_isolated, sampling
from training.split import Split
from training.stages import prompt_config, prompt_histories, sample_users

log = logging.getLogger(__name__)

# the row of the SASRec with preference texts, by llm.preference_source
PREFERENCE_ROWS = {"llm": "SASRec + base-LLM preferences", "history": "SASRec + history text (no LLM)"}


def preference_messages_of(
    cfg: PipelineConfig, catalog: Catalog, split: Split, users: list[str]
) -> dict[str, list[Message]]:
    """The preference prompt's chat messages per user, from the training items only."""
    prompt_cfg = prompt_config(cfg)
    return {
        user: preference_messages(prompt_items(catalog, items, ratings), prompt_cfg)
        for user, (items, ratings) in prompt_histories(split, users).items()
    }


def history_texts(
    catalog: Catalog, histories: dict[str, tuple[list[int], list[float] | None]], prompt_cfg: PromptConfig
) -> dict[str, str]:
    """Per user, the history lines the preference prompt would show, without any LLM (the control)."""
    return {
        user: history_text(prompt_items(catalog, items, ratings), prompt_cfg)
        for user, (items, ratings) in histories.items()
    }


def llm_preferences(
    cfg: PipelineConfig, catalog: Catalog, split: Split, users: list[str], model_dir: Path
) -> tuple[dict[str, str], dict[str, list[str]] | None]:
    """The base LLM's greedy preference for every user, and (with the DPO loop on) round 1's N samples per
    DPO user, from one engine (the greedy job runs first and alone, so its texts do not depend on it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = preference_messages_of(cfg, catalog, split, users)
    rendered = {u: render(tokenizer, m) for u, m in messages.items()}
    base = EngineWeights(str(model_dir))
    jobs = [EngineJob.generate([rendered[u] for u in users], greedy(cfg), base)]
    p = cfg.preference_dpo
    dpo_users = sample_users(users, p.max_users, p.seed) if p.rounds else []
    if dpo_users:
        jobs.append(EngineJob.generate([rendered[u] for u in dpo_users], sampling(cfg), base))
    outputs = run_isolated(engine_jobs, engine_cfg(cfg, p.seed + 1 if dpo_users else cfg.llm.seed), jobs)
    texts = {u: g[0] for u, g in zip(users, outputs[0], strict=True)}
    return texts, (dict(zip(dpo_users, outputs[1], strict=True)) if dpo_users else None)


def reuse_preferences(run: Path, users: list[str]) -> dict[str, str]:
    """The preference texts of an earlier training run, for the same users (checked)."""
    manifest = read_manifest(run)
    if manifest.get("preferences_refreshed"):
        raise RunDirError(
            f"{run}: its preferences were refreshed from full histories (dpo4rec preferences), which include "
            "the validation and test items; reuse the texts of a training run instead"
        )
    texts, _ = load_preferences(run)
    missing = [u for u in users if u not in texts]
    if missing:
        raise RunDirError(f"{run / TEXTS} has no text for {len(missing)} users, e.g. {missing[:5]}")
    log.info("reusing %d preference texts from %s", len(users), run)
    return {u: texts[u] for u in users}


def base_preferences(
    cfg: PipelineConfig, catalog: Catalog, split: Split, users: list[str]
) -> tuple[dict[str, str], dict[str, list[str]] | None]:
    """The base row's texts from the configured source, and round 1's samples when the LLM wrote them."""
    if cfg.llm.preference_source == "history":
        return history_texts(catalog, prompt_histories(split, users), prompt_config(cfg)), None
    if cfg.llm.preferences_from:
        return reuse_preferences(Path(cfg.llm.preferences_from), users), None
    return llm_preferences(cfg, catalog, split, users, model_folder(cfg))


def model_folder(cfg: PipelineConfig) -> Path:
    """The base LLM's folder (converted from its wheel or GGUF once, then cached)."""
    from llm.models import resolve_model

    return resolve_model(cfg.llm.model, Path(cfg.llm.model_cache).expanduser())
