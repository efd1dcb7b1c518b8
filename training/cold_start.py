"""The cold-start protocol (SPEC section 10): where IDs are blind, does text help, and does the LLM add to it?

On the split of ``training.cold_split`` (held-out latest items, held-out users), one seed trains plain SASRec
on the warm data and fits two maps from item features into its item space on the warm items: the content
tower (``retrieval.content``: MiniLM over title, genres, year) and the genre/decade control (a multi-hot
through the same ridge map: the baseline a text model must beat). Slices and arms:

- ``new-items shelf``: rank all of a half's new items for each event. Arms: popularity (no signal: ties
  broken at random), SASRec alone (the untrained rows an ID model has for items it never saw), genre/decade,
  content tower, the LLM over the content tower's top K, the fused order;
- ``new items in the catalog``: known items (SASRec's vectors) + the half's new items (each arm's vectors);
- ``new users k=1,3,5``: a held-out user's first k items revealed, the next one ranked over the known items.
  Arms: popularity, SASRec, the LLM over SASRec's top K, the fused order.

The LLM is the run's base model, zero-shot, its label prior (PriDe) estimated on shifted validation lists
and removed; its preference text is the history stand-in the service uses on a cache miss. The fusion weight
of each slice is chosen on the validation half only: the best validation NDCG@10 over a grid, kept only when
a paired bootstrap on validation puts its gain over weight 0 above 0 (else 0: the LLM is not called there).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llm.labels import candidate_labels
from llm.prompts import history_text
from llm.scoring import ScoringSpec, estimate_prior, fused_scores, item_logprobs, order, shifts
from retrieval.catalog import Catalog
from retrieval.content import ContentTower, fit_text_tower, genre_decade_features, text_vectors
from retrieval.encoder import EncoderConfig, TextEncoder
from retrieval.sasrec import SASRec
from rundir.items import prompt_items
from training import ranking_metrics as M
from training.cold_split import ColdSplit, Event, cold_split
from training.config import PipelineConfig
from training.data import load_dataset
from training.engines import EngineJob, EngineWeights, engine_cfg, engine_jobs, run_isolated
from training.rerank import RerankExample, ScoringPrompts, evaluation_examples
from training.stages import StageTimer, prompt_config, train_sasrec

log = logging.getLogger(__name__)

HALVES = ("valid", "test")
NO_LLM_ARMS = ("popularity", "SASRec", "genre/decade", "content tower")


@dataclass
class ColdStartConfig:
    item_share: float = 0.2  # the latest-appearing items held out (new releases)
    user_share: float = 0.2  # users held out of all training (new users)
    ks: tuple[int, ...] = (1, 3, 5)  # items a new user reveals
    protocol_seed: int = 0  # which users are held out: the same in every seed's run, so seeds pair
    rerank_k: int = 20  # candidates the LLM scores
    recent_items: int = 3  # the prompt's newest history items (as the small run serves)
    preference_chars: int = 150  # the history stand-in cut to this, as the service cuts a miss's
    llm: bool = True  # score the LLM arms (an engine run; off: the non-LLM arms only)
    calibration_lists: int = 64  # validation lists per slice whose shifted orders estimate the label prior
    calibration_shifts: int = 4
    fusion_weights: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)
    bootstrap: int = 2000
    max_events: int | None = None  # per slice and half (a smoke run); None: every event


@dataclass
class Slice:
    """One slice of one half: its events, the candidates each may rank, and every arm's scores."""

    name: str
    events: list[Event]
    candidates: np.ndarray  # (N+1,) bool
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # arm -> (E, N+1)
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # arm -> (E,) 0-based target ranks
    base: str = "content tower"  # the arm whose top K the LLM re-ranks

    def rank(self, arm: str, scores: np.ndarray) -> None:
        masked = np.where(self.candidates[None, :], scores, -np.inf)  # (E, N+1)
        for row, e in zip(masked, self.events, strict=True):
            row[list(e.history)] = -np.inf  # seen: never a candidate (nor in the LLM's list)
        targets = np.array([e.target for e in self.events])
        self.scores[arm] = masked
        self.ranks[arm] = M.ranks_of_targets(masked, targets, [list(e.history) for e in self.events])


def _user_vectors(model: SASRec, events: Sequence[Event]) -> np.ndarray:
    """SASRec's user vectors (E, H) for the events' histories (newest ``max_len`` items)."""
    return model.user_vectors([list(e.history)[-model.cfg.max_len :] for e in events])


def _item_spaces(
    model: SASRec, catalog: Catalog, split: ColdSplit, encoder: TextEncoder
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Item matrices (N+1, H) per arm: SASRec's own, and with the held-out rows from each content map."""
    trained = model.item_vectors()
    warm = sorted(split.training_items())
    held = np.flatnonzero(~split.known[1:]) + 1
    text = fit_text_tower(encoder, catalog, warm, trained)
    items = [catalog[i] for i in range(1, len(catalog) + 1)]
    genres = sorted({g for it in items for g in it.genres})
    decades = sorted({it.year // 10 * 10 for it in items if it.year is not None})
    feats = np.vstack(
        [np.zeros((1, len(genres) + len(decades) + 1), np.float32), genre_decade_features(items, genres, decades)]
    )
    control = ContentTower.fit(feats[warm], trained[warm], features="genre_decade")
    spaces = {"SASRec": trained, "content tower": trained.copy(), "genre/decade": trained.copy()}
    held_items = [catalog[int(i)] for i in held]
    spaces["content tower"][held] = text_vectors(text, encoder, held_items)
    spaces["genre/decade"][held] = control.vectors(feats[held])
    info = {
        "warm_items": len(warm),
        "held_out_items": len(held),
        "content_tower": {"alpha": text.alpha, "holdout_r2": text.holdout_r2},
        "genre_decade": {"alpha": control.alpha, "holdout_r2": control.holdout_r2},
    }
    return spaces, info


def _slices(split: ColdSplit, half: str, ks: Sequence[int], cap: int | None) -> list[Slice]:
    n = len(split.known)
    shelf = np.zeros(n, bool)
    shelf[split.new_items[half]] = True
    catalog = split.known | shelf
    out = [
        Slice("new-items shelf", split.item_events[half], shelf),
        Slice("new items in the catalog", split.item_events[half], catalog),
    ]
    out += [Slice(f"new users k={k}", split.user_events[k][half], split.known.copy(), base="SASRec") for k in ks]
    for s in out:
        s.events = s.events[:cap]
    return [s for s in out if s.events]


def _no_llm_arms(sl: Slice, model: SASRec, spaces: Mapping[str, np.ndarray], popularity: np.ndarray, seed: int) -> None:
    q = _user_vectors(model, sl.events)  # (E, H)
    jitter = np.random.default_rng(seed).random((len(sl.events), len(popularity))) * 1e-6  # random tie-breaks
    sl.rank("popularity", popularity[None, :] + jitter)
    arms = ("SASRec",) if sl.name.startswith("new users") else ("SASRec", "genre/decade", "content tower")
    for arm in arms:
        sl.rank(arm, q @ spaces[arm].T)


def _examples(sl: Slice, catalog: Catalog, k: int, labels: Any, prompt_cfg: Any) -> list[RerankExample]:
    """The base arm's top K per event as a re-rank list; the preference is the history stand-in."""
    keys = [f"{j}" for j in range(len(sl.events))]
    scores = sl.scores[sl.base]
    retrieved = {}
    for key, row in zip(keys, scores, strict=True):
        top = order(row)[:k]
        retrieved[key] = (top.tolist(), row[top].tolist())
    histories = {key: list(e.history) for key, e in zip(keys, sl.events, strict=True)}
    stand_in = {key: history_text(prompt_items(catalog, h), prompt_cfg) for key, h in histories.items()}
    targets = {key: e.target for key, e in zip(keys, sl.events, strict=True)}
    return evaluation_examples(catalog, keys, histories, targets, retrieved, stand_in, labels, prompt_cfg)


def _llm_ranks(sl: Slice, examples: Sequence[RerankExample], scores: Sequence[np.ndarray]) -> np.ndarray:
    """The base arm's ranks with each list's target moved to its place in ``scores`` (a target outside the
    top K keeps its base rank)."""
    ranks = sl.ranks[sl.base].copy()
    for j, (e, s) in enumerate(zip(examples, scores, strict=True)):
        if e.target_position is not None:
            ranks[j] = int(np.flatnonzero(order(s) == e.target_position)[0])
    return ranks


def _choose_weight(valid: dict[str, np.ndarray], weights: Sequence[float], n_boot: int) -> tuple[float, dict[str, Any]]:
    """The weight with the best validation NDCG@10, kept when its paired gain over 0 has a CI above 0."""
    ndcg = {w: M.per_user(valid[f"w={w:g}"])["NDCG@10"] for w in weights}
    best = max(weights, key=lambda w: (ndcg[w].mean(), -w))
    diff = M.bootstrap_diff(ndcg[best], ndcg[0.0], n_boot=n_boot) if best else None
    chosen = best if diff is not None and diff["ci_low"] > 0 else 0.0
    return chosen, {
        "valid_ndcg10": {f"{w:g}": float(ndcg[w].mean()) for w in weights},
        "best": best,
        "gain": diff,
        "chosen": chosen,
    }


def run_seed(cfg: PipelineConfig, cs: ColdStartConfig, seed: int, timer: StageTimer) -> dict[str, Any]:
    """One seed of the protocol: per-event ranks of every arm on every slice of both halves, and the weights."""
    cfg = replace(cfg, retriever=replace(cfg.retriever, seed=seed))
    dataset = load_dataset(cfg.data.name, Path(cfg.data.data_dir))
    catalog = dataset.catalog
    with timer(f"split_{seed}"):
        split = cold_split(
            dataset.interactions, len(catalog), item_share=cs.item_share, user_share=cs.user_share, ks=cs.ks,
            min_interactions=cfg.data.min_interactions, seed=cs.protocol_seed,
        )  # fmt: skip
    users = split.train.ids()
    with timer(f"sasrec_{seed}"):
        model, _ = train_sasrec(cfg, catalog, split.train, users, None, 0)
    encoder = TextEncoder(EncoderConfig())
    spaces, info = _item_spaces(model, catalog, split, encoder)
    popularity = np.zeros(len(catalog) + 1)
    for u in split.train.users.values():
        np.add.at(popularity, np.asarray([*u.train, u.valid, u.test]), 1.0)
    halves = {half: _slices(split, half, cs.ks, cs.max_events) for half in HALVES}
    for slices in halves.values():
        for sl in slices:
            _no_llm_arms(sl, model, spaces, popularity, seed)
    weights: dict[str, Any] = {}
    if cs.llm:
        with timer(f"llm_{seed}"):
            weights = _llm_arms(cfg, cs, catalog, halves, info)
    return {
        "seed": seed,
        "info": info,
        "weights": weights,
        "events": {half: {sl.name: len(sl.events) for sl in slices} for half, slices in halves.items()},
        "ranks": {
            half: {sl.name: {a: r.tolist() for a, r in sl.ranks.items()} for sl in slices}
            for half, slices in halves.items()
        },
    }


def _llm_arms(
    cfg: PipelineConfig, cs: ColdStartConfig, catalog: Catalog, halves: dict[str, list[Slice]], info: dict[str, Any]
) -> dict[str, Any]:
    """Score every slice's top-K lists with the zero-shot LLM (prior removed), then choose and apply the weights."""
    from transformers import AutoTokenizer

    from training.base_preferences import model_folder

    model_dir = model_folder(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_cfg = replace(prompt_config(cfg), max_recent=cs.recent_items, max_preference_chars=cs.preference_chars)
    labels = candidate_labels(tokenizer, cs.rerank_k)
    prompts = ScoringPrompts(tokenizer, prompt_cfg)
    examples: dict[tuple[str, str], list[RerankExample]] = {}
    calibration = shifts(cs.rerank_k, cs.calibration_shifts)
    for half, slices in halves.items():
        for sl in slices:
            ex = examples[half, sl.name] = _examples(sl, catalog, cs.rerank_k, labels, prompt_cfg)
            if half == "valid":
                prompts.add(f"calibration/{sl.name}", ex[: cs.calibration_lists], calibration)
            prompts.add(f"{half}/{sl.name}", ex, [0])
    log.info("cold start: %d prompts for the LLM arms", len(prompts.prompts))
    job = EngineJob.score(prompts.prompts, prompts.label_ids, EngineWeights(str(model_dir)))
    raw = run_isolated(engine_jobs, engine_cfg(cfg), [job])[0]
    blocks = [b for sl in halves["valid"] for b in prompts.split(raw, f"calibration/{sl.name}")]
    spec = ScoringSpec(weight=None, log_prior=tuple(estimate_prior(blocks)), permutations=1)
    info["llm"] = {"prompts": len(prompts.prompts), "model": cfg.llm.model, "label_prior": list(spec.log_prior or ())}
    llm_scores = {
        key: [item_logprobs(per, [0], spec) for per in prompts.split(raw, f"{key[0]}/{key[1]}")] for key in examples
    }
    chosen: dict[str, Any] = {}
    for name in [sl.name for sl in halves["valid"]]:
        grids = {}
        for half in HALVES:
            sl = next((s for s in halves[half] if s.name == name), None)
            if sl is None:
                continue
            ex, scores = examples[half, name], llm_scores[half, name]
            sl.ranks["LLM (zero-shot, de-biased)"] = _llm_ranks(sl, ex, scores)
            grids[half] = {
                f"w={w:g}": _llm_ranks(
                    sl,
                    ex,
                    [fused_scores(np.asarray(e.retriever_scores), s, w) for e, s in zip(ex, scores, strict=True)],
                )
                for w in cs.fusion_weights
            }
        weight, detail = _choose_weight(grids["valid"], cs.fusion_weights, cs.bootstrap)
        chosen[name] = detail
        for half in HALVES:
            sl = next((s for s in halves[half] if s.name == name), None)
            if sl is not None:
                sl.ranks["fused (weight chosen on validation)"] = grids[half][f"w={weight:g}"]
    return chosen


def summarize(seeds: Sequence[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """Per slice and arm on the test half: NDCG@10 and Recall@10 (mean and spread over seeds), and the paired
    bootstrap CI of each arm against the best non-LLM arm on per-event metrics averaged over the seeds."""
    out: dict[str, Any] = {}
    for name in seeds[0]["ranks"]["test"]:
        arms = list(seeds[0]["ranks"]["test"][name])
        per_event = {
            arm: {
                m: np.mean([M.per_user(np.array(s["ranks"]["test"][name][arm]))[m] for s in seeds], axis=0)
                for m in ("NDCG@10", "Recall@10")
            }
            for arm in arms
        }
        per_seed = {
            arm: [float(M.per_user(np.array(s["ranks"]["test"][name][arm]))["NDCG@10"].mean()) for s in seeds]
            for arm in arms
        }
        best = max((a for a in arms if a in NO_LLM_ARMS), key=lambda a: per_event[a]["NDCG@10"].mean())
        rows = []
        for arm in arms:
            row = {
                "arm": arm,
                "NDCG@10": float(per_event[arm]["NDCG@10"].mean()),
                "NDCG@10 sd over seeds": float(np.std(per_seed[arm])),
                "Recall@10": float(per_event[arm]["Recall@10"].mean()),
            }
            if arm != best:
                row["vs best non-LLM"] = M.bootstrap_diff(
                    per_event[arm]["NDCG@10"], per_event[best]["NDCG@10"], n_boot=n_boot
                )
            rows.append(row)
        out[name] = {"events": seeds[0]["events"]["test"][name], "best_non_llm": best, "rows": rows}
    return out


def run_protocol(cfg: PipelineConfig, cs: ColdStartConfig, seeds: Sequence[int]) -> dict[str, Any]:
    timer = StageTimer()
    results = [run_seed(cfg, cs, seed, timer) for seed in seeds]
    return {
        "config": asdict(cs),
        "seeds": list(seeds),
        "dataset": cfg.data.name,
        "test": summarize(results, cs.bootstrap),
        "per_seed": results,
        "stage_seconds": timer.seconds,
    }
