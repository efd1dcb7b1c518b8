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

The LLM scorers: the run's base model zero-shot and (``trained``) the re-rank adapters trained on this split's
warm data the way the chain trains them (``training.rerank_training.fit_adapters``: SFT on the target label,
then DPO continuing it; shuffled lists and lists of the cold kind, no held-out item or user in any of them),
each scoring on its own: SFT, and SFT+DPO (the one the chain serves). Each scorer's label
prior (PriDe) is estimated on shifted validation lists and removed; the preference text is the history
stand-in the service uses on a cache miss. The fusion weight of each slice and scorer is chosen on the
validation half only: the best validation NDCG@10 over a grid, kept only when a paired bootstrap on validation
puts its gain over weight 0 above 0 (else 0: the LLM is not called there). The served scorer's weights (SFT+DPO's
when trained) are the run's ``weights``.

Each seed's result is written to ``OUT/seed_N.json`` as it finishes; a later run reuses a scorer's arms from
it when the seed's base arms' ranks come out identical (SASRec retrained to the same weights) and the prompt
and LLM settings match, so adding a scorer or the text arms does not pay for the others again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llm.labels import candidate_labels
from llm.scoring import ScoringSpec, estimate_prior, fused_scores, item_logprobs, order, shifts
from retrieval.catalog import Catalog
from retrieval.content import ContentTower, fit_text_tower, genre_decade_features, text_vectors
from retrieval.encoder import EncoderConfig, TextEncoder
from retrieval.sasrec import SASRec
from rundir.items import prompt_items
from rundir.manifest import atomic_write_text
from training import ranking_metrics as M
from training.base_preferences import history_texts
from training.cold_split import ColdSplit, Event, cold_split
from training.config import LLMSection, PipelineConfig, RerankSection
from training.data import load_dataset
from training.engines import EngineJob, EngineWeights, engine_cfg, engine_jobs, greedy, run_isolated
from training.rerank import (
    RerankExample,
    ScoringPrompts,
    draw_positions,
    evaluation_examples,
    list_positions,
    negative_counts,
    retrieve,
    stand_in_text,
    training_lists,
)
from training.rerank_training import COLD_TRAIN_ITEMS, fit_adapters
from training.stages import StageTimer, popularity_scores, prompt_config, sample_users, train_sasrec

log = logging.getLogger(__name__)

HALVES = ("valid", "test")
BASE_ARMS = ("popularity", "SASRec", "genre/decade", "content tower")
# SASRec trained with a text per user (training.base_preferences' two sources): the LLM's, and the history lines
# it would read (the no-LLM control)
PREFERENCE_ARMS = {"llm": "SASRec + LLM preference", "history": "SASRec + history text (no LLM)"}
LIFTED = "content tower, new items lifted"
NO_LLM_ARMS = (*BASE_ARMS, LIFTED, PREFERENCE_ARMS["history"])
LIFTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # a new item's score + lift x the row's score sd (LIFTED)
ZERO_SHOT, SFT, TRAINED = "zero-shot", "SFT", "SFT+DPO"  # SFT+DPO continues SFT's adapter: the one served
# what a seed's LLM arms depend on beyond its non-LLM ranks: a previous seed file is reused only when they match
PROMPT_SETTINGS = ("rerank_k", "recent_items", "preference_chars", "calibration_lists", "calibration_shifts",
                   "fusion_weights", "bootstrap", "max_events")  # fmt: skip


def llm_arm(scorer: str) -> str:
    return f"LLM ({scorer}, de-biased)"


def fused_arm(scorer: str) -> str:
    return f"fused ({scorer}, weight chosen on validation)"


# what the LLM itself changes, arm against the arm it differs from in one step: its preference text against the
# history lines it reads (and those against plain SASRec), each re-rank training against the scorer it starts from
CONTRASTS = (
    (PREFERENCE_ARMS["llm"], PREFERENCE_ARMS["history"]),
    (PREFERENCE_ARMS["history"], "SASRec"),
    (llm_arm(SFT), llm_arm(ZERO_SHOT)),
    (llm_arm(TRAINED), llm_arm(SFT)),
    (llm_arm(TRAINED), llm_arm(ZERO_SHOT)),
)


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
    trained: bool = True  # also train the re-rank adapter (SFT, then DPO) on the warm split and score with both
    preference_arms: bool = True  # SASRec with the LLM's preference text, and with the history lines (control)
    rerank: RerankSection | None = None  # its lists and training settings (None: the run config's rerank section)
    text_llm: LLMSection | None = None  # how the LLM writes the text arms' preferences (None: the run config's)
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
    tower_space, text = _content_space(trained, catalog, split, encoder)
    items = [catalog[i] for i in range(1, len(catalog) + 1)]
    genres = sorted({g for it in items for g in it.genres})
    decades = sorted({it.year // 10 * 10 for it in items if it.year is not None})
    feats = np.vstack(
        [np.zeros((1, len(genres) + len(decades) + 1), np.float32), genre_decade_features(items, genres, decades)]
    )
    control = ContentTower.fit(feats[warm], trained[warm], features="genre_decade")
    spaces = {"SASRec": trained, "content tower": tower_space, "genre/decade": trained.copy()}
    spaces["genre/decade"][held] = control.vectors(feats[held])
    info = {
        "warm_items": len(warm),
        "held_out_items": len(held),
        "content_tower": {"alpha": text.alpha, "holdout_r2": text.holdout_r2},
        "genre_decade": {"alpha": control.alpha, "holdout_r2": control.holdout_r2},
    }
    return spaces, info


def _content_space(
    trained: np.ndarray, catalog: Catalog, split: ColdSplit, encoder: TextEncoder | MemoEncoder
) -> tuple[np.ndarray, ContentTower]:
    """``trained`` (N+1, H) with the held-out items' rows from the text tower fit on the warm items' rows."""
    held = np.flatnonzero(~split.known[1:]) + 1
    tower = fit_text_tower(encoder, catalog, sorted(split.training_items()), trained)
    space = trained.copy()
    space[held] = text_vectors(tower, encoder, [catalog[int(i)] for i in held])
    return space, tower


class MemoEncoder:
    """``encoder`` that encodes each distinct text once (``memo``: text -> vector, kept across seeds). Only the text
    arms use it; the base arms' encodings stay batch for batch those of the seed's earlier runs (reuse compares
    their ranks)."""

    def __init__(self, encoder: TextEncoder, memo: dict[str, np.ndarray]) -> None:
        self.encoder, self.memo, self.dim = encoder, memo, encoder.dim

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        self.memo.update(zip(todo, self.encoder.encode(todo, progress=progress), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def event_key(e: Event) -> str:
    """An event's history is a prefix of its user's known-item sequence: user and length name it."""
    return f"{e.user}@{len(e.history)}"


def preference_texts(cfg: PipelineConfig, dataset: Any, split: ColdSplit, source: str, cache: Path) -> dict[str, str]:
    """A text per warm user (from the training part of the history, as ``training.base_preferences`` writes it)
    and per event (from the event's history: what was known then): the base LLM's greedy preference
    (``source`` "llm", generated once and kept in ``cache``: the split and the LLM do not change with the seed)
    or the history lines it reads (``source`` "history", the no-LLM control)."""
    from llm.prompts import preference_messages, render

    catalog = dataset.catalog
    frame = dataset.interactions
    pairs = zip(frame["user_id"].astype(str), frame["item"].astype(int), strict=True)
    rating = dict(zip(pairs, frame["rating"].astype(float), strict=True))
    histories = {u: (list(us.train), list(us.train_ratings)) for u, us in split.train.users.items()}
    events = [e for half in HALVES for e in split.item_events[half]]
    events += [e for halves in split.user_events.values() for half in HALVES for e in halves[half]]
    for e in events:
        histories[event_key(e)] = (list(e.history), [rating[e.user, i] for i in e.history])
    prompt_cfg = prompt_config(cfg)
    if source == "history":
        return history_texts(catalog, histories, prompt_cfg)
    settings = llm_settings(cfg)
    kept = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    texts = kept.get("texts", {}) if kept.get("settings") == settings else {}
    todo = [key for key in histories if key not in texts]
    if todo:
        from transformers import AutoTokenizer

        from training.base_preferences import model_folder

        model_dir = model_folder(cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = [
            render(tokenizer, preference_messages(prompt_items(catalog, *histories[key]), prompt_cfg)) for key in todo
        ]
        log.info("cold start: %d preference texts to write", len(todo))
        job = EngineJob.generate(prompts, greedy(cfg), EngineWeights(str(model_dir)))
        outputs = run_isolated(engine_jobs, engine_cfg(cfg), [job])[0]
        texts |= {key: g[0] for key, g in zip(todo, outputs, strict=True)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"settings": settings, "texts": texts}))
    return {key: texts[key] for key in histories}


def _preference_arms(
    cfg: PipelineConfig,
    catalog: Catalog,
    split: ColdSplit,
    halves: dict[str, list[Slice]],
    encoder: TextEncoder | MemoEncoder,
    texts: Mapping[str, Mapping[str, str]],
) -> dict[str, Any]:
    """Per source of ``texts``, SASRec trained with the warm users' texts (``training.stages.train_sasrec``, as the
    pipeline's preference row), queried with each event's own text; held-out items through its own content tower."""
    users = split.train.ids()
    info: dict[str, Any] = {}
    for source, by_key in texts.items():
        arm = PREFERENCE_ARMS[source]
        keys = [*users, *sorted({event_key(e) for slices in halves.values() for sl in slices for e in sl.events})]
        vectors = dict(zip(keys, encoder.encode([by_key[k] for k in keys]), strict=True))
        prefs = {u: vectors[u] for u in users}
        model, _ = train_sasrec(cfg, catalog, split.train, users, prefs, encoder.dim)
        space, tower = _content_space(model.item_vectors(), catalog, split, encoder)
        info[arm] = {"content_tower_holdout_r2": tower.holdout_r2}
        for slices in halves.values():
            for sl in slices:
                seqs = [list(e.history)[-model.cfg.max_len :] for e in sl.events]
                q = model.user_vectors(seqs, np.stack([vectors[event_key(e)] for e in sl.events]))
                sl.rank(arm, q @ space.T)
    return info


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


def _lifted(
    split: ColdSplit, model: SASRec, space: np.ndarray, halves: dict[str, list[Slice]], cs: ColdStartConfig
) -> dict[str, Any]:
    """The catalog slice's content-tower order with the half's new items raised by ``lift`` x each row's score sd
    (the ridge map shrinks new items' vectors: they score below every popular known item). The lift is chosen on
    the validation half over the mix the service meets: that slice's new-item events *and* every warm user's
    validation item ranked over the same catalog, so a lift that buries known targets loses; ties: the smaller.
    On test: arm ``LIFTED`` and, in the returned info, what the lift costs the warm users' test items."""
    warm = {
        "valid": [Event(u, tuple(us.train), us.valid) for u, us in split.train.users.items()],
        "test": [Event(u, (*us.train, us.valid), us.test) for u, us in split.train.users.items()],
    }
    ndcg: dict[str, dict[float, tuple[np.ndarray, np.ndarray]]] = {}
    new: dict[str, Slice] = {}
    lifted: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # half -> the new-item events' scores, 1 x sd on new items
    for half in HALVES:
        found = next((sl for sl in halves[half] if sl.name == "new items in the catalog"), None)
        if found is None:
            return {}
        new[half] = found
        rows = np.zeros(len(split.known))
        rows[split.new_items[half]] = 1.0
        both = [found, Slice("warm users in the catalog", warm[half][: cs.max_events], found.candidates)]
        raw = [_user_vectors(model, sl.events) @ space.T for sl in both]
        unit = [scores[:, 1:].std(axis=1, keepdims=True) * rows[None, :] for scores in raw]
        lifted[half] = (raw[0], unit[0])
        ndcg[half] = {}
        for lift in LIFTS:
            for sl, scores, step in zip(both, raw, unit, strict=True):
                sl.rank(LIFTED, scores + lift * step)
            ndcg[half][lift] = tuple(M.per_user(sl.ranks[LIFTED])["NDCG@10"] for sl in both)  # type: ignore[assignment]
    mixed = {lift: float(np.concatenate(ndcg["valid"][lift]).mean()) for lift in LIFTS}
    chosen = max(LIFTS, key=lambda lift: (mixed[lift], -lift))
    for half in HALVES:
        scores, step = lifted[half]
        new[half].rank(LIFTED, scores + chosen * step)
    test_warm = {f"{lift:g}": float(ndcg["test"][lift][1].mean()) for lift in LIFTS}
    return {
        "chosen": chosen,
        "valid_mixed_ndcg10": {f"{lift:g}": v for lift, v in mixed.items()},
        "valid_events": {"new": len(ndcg["valid"][0.0][0]), "warm": len(ndcg["valid"][0.0][1])},
        "test_warm_ndcg10": test_warm,
        "test_warm_cost": M.bootstrap_diff(ndcg["test"][chosen][1], ndcg["test"][0.0][1], n_boot=cs.bootstrap)
        if chosen
        else None,
    }


def _examples(sl: Slice, catalog: Catalog, k: int, labels: Any, prompt_cfg: Any) -> list[RerankExample]:
    """The base arm's top K per event as a re-rank list; the preference is the history stand-in."""
    keys = [f"{j}" for j in range(len(sl.events))]
    scores = sl.scores[sl.base]
    retrieved = {}
    for key, row in zip(keys, scores, strict=True):
        top = order(row)[:k]
        retrieved[key] = (top.tolist(), row[top].tolist())
    histories = {key: list(e.history) for key, e in zip(keys, sl.events, strict=True)}
    stand_in = {key: stand_in_text(catalog, h, prompt_cfg) for key, h in histories.items()}
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


def adapter_settings(cfg: PipelineConfig, cs: ColdStartConfig, seed: int) -> RerankSection:
    """The adapter's re-rank section: the configured lists and training, at the protocol's K and prompt lengths,
    seeded by the run's seed (lists, negatives, LoRA init: seeds differ in the adapter as in SASRec)."""
    rc = cs.rerank or cfg.rerank
    return replace(
        rc,
        k=cs.rerank_k,
        recent_items=cs.recent_items,
        preference_chars=cs.preference_chars,
        seed=seed,
        sft=replace(rc.sft, seed=seed, max_length=1024, max_prompt_length=1000),
        dpo=replace(rc.dpo, seed=seed, max_length=1024, max_prompt_length=1000),
    )


def protocol_lists(
    rc: RerankSection, catalog: Catalog, split: ColdSplit, model: SASRec, labels: Any, prompt_cfg: Any
) -> list[RerankExample]:
    """The adapter's training lists on the warm split, built as the chain builds them (``training.rerank_training``):
    ``rc.train_lists`` shuffled lists (the retriever's hard negatives, popular, uniform) and ``rc.cold_lists`` of
    the cold kind (the newest few items, uniform negatives). The preference is always the prefix's history text,
    as the protocol's prompts carry it; held-out items are banned beside each user's validation and test items,
    so none is ever a candidate, and held-out users are not in the warm split at all."""
    users = split.train.ids()
    train = {u: split.train.users[u].train for u in users}
    held = [int(i) for i in np.flatnonzero(~split.known[1:]) + 1]
    banned = {u: [split.train.users[u].valid, split.train.users[u].test, *held] for u in users}
    pool = [(u, t) for u in users for t in list_positions(catalog, train[u], "", rc.positions_per_user)]
    keys = [f"{u}@{t}" for u, t in pool]
    picked = set(sample_users(keys, rc.train_lists, rc.seed))
    chosen = [p for p, key in zip(pool, keys, strict=True) if key in picked]
    cold = draw_positions(
        [p for p, key in zip(pool, keys, strict=True) if key not in picked], rc.cold_lists, rc.seed + 2
    )
    counts = negative_counts(rc.k, rc.negatives.hard, rc.negatives.popular, rc.negatives.uniform)
    chosen_keys = [f"{u}@{t}" for u, t in chosen]
    ranked = retrieve(
        model,
        {f"{u}@{t}": train[u][:t] for u, t in chosen},
        None,
        chosen_keys,
        counts[0] + 2,
        banned={f"{u}@{t}": [*banned[u], train[u][t]] for u, t in chosen},
    )
    items = {key: top for key, (top, _) in ranked.items()} | {f"{u}@{t}": [] for u, t in cold}
    common = (train, banned, items, popularity_scores(catalog, train), {}, labels, prompt_cfg)
    shuffled = training_lists(catalog, chosen, *common, counts, rc.seed, stand_in=True)
    cold_kind = training_lists(catalog, cold, *common, (0, 0, rc.k - 1), rc.seed, cut=rc.cold_items or COLD_TRAIN_ITEMS)
    return shuffled + cold_kind


def llm_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The run configuration's part of the LLM arms' prompts and texts (a seed file records it)."""
    return {"model": cfg.llm.model, "history_items": cfg.llm.history_items, "max_tokens": cfg.llm.max_tokens}


def _base_matches(
    previous: dict[str, Any] | None, cfg: PipelineConfig, cs: ColdStartConfig, halves: dict[str, list[Slice]]
) -> bool:
    """Whether the arms ``previous`` (this seed's earlier file) holds may be reused: the same prompt settings and,
    arm by arm, the same ranks of the base arms (``BASE_ARMS``: the same SASRec, lists and prompts). A file from
    before ``llm_settings`` was recorded (2026-12-06, the default configuration's) is taken at its word."""
    settings = json.loads(json.dumps(asdict(cs)))  # as the file holds them (tuples are lists)
    if not previous or any(previous["config"].get(k) != settings[k] for k in PROMPT_SETTINGS):
        return False
    if previous.get("llm_settings", llm_settings(cfg)) != llm_settings(cfg):
        return False
    for half, slices in halves.items():
        for sl in slices:
            old = previous["ranks"].get(half, {}).get(sl.name, {})
            if any(old.get(arm) != ranks.tolist() for arm, ranks in sl.ranks.items() if arm in BASE_ARMS):
                log.info("cold start: seed %s's base ranks differ from its last run: scoring again", previous["seed"])
                return False
    return True


def _reuse_arms(previous: dict[str, Any], arms: Sequence[str], halves: dict[str, list[Slice]]) -> None:
    for half, slices in halves.items():
        for sl in slices:
            for arm in arms:
                sl.ranks[arm] = np.asarray(previous["ranks"][half][sl.name][arm])
    log.info("cold start: seed %s reuses %s", previous["seed"], ", ".join(arms))


def run_seed(
    cfg: PipelineConfig, cs: ColdStartConfig, seed: int, timer: StageTimer, work: Path,
    previous: dict[str, Any] | None = None,
    memo: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
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
    info["lift"] = _lifted(split, model, spaces["content tower"], halves, cs)
    matches = _base_matches(previous, cfg, cs, halves)
    if cs.preference_arms:
        sources = [source for source in PREFERENCE_ARMS if cs.llm or source == "history"]  # "llm": an engine run
        arms = [PREFERENCE_ARMS[source] for source in sources]
        if matches and all(a in previous["ranks"]["test"][sl.name] for sl in halves["test"] for a in arms):
            _reuse_arms(previous, arms, halves)
            info["preference_arms"] = previous["info"].get("preference_arms", {})
        else:
            cache = work / "preferences_llm.json"
            text_cfg = replace(cfg, llm=cs.text_llm) if cs.text_llm else cfg
            texts = {source: preference_texts(text_cfg, dataset, split, source, cache) for source in sources}
            with timer(f"preference_arms_{seed}"):
                memoized = MemoEncoder(encoder, {} if memo is None else memo)
                info["preference_arms"] = _preference_arms(text_cfg, catalog, split, halves, memoized, texts)
    by_model: dict[str, Any] = {}
    if cs.llm:
        by_model = _reused(previous, list(previous.get("weights_by_model", {})) if matches else [], halves, info)
        wanted = [ZERO_SHOT, *([SFT, TRAINED] if cs.trained else [])]
        todo = [m for m in wanted if m not in by_model]
        if todo:
            with timer(f"llm_{seed}"):
                by_model |= _llm_arms(cfg, cs, catalog, split, model, halves, info, todo, work / f"seed_{seed}", timer)
    served = TRAINED if TRAINED in by_model else ZERO_SHOT
    return {
        "seed": seed,
        "config": asdict(cs),
        "llm_settings": llm_settings(cfg),
        "info": info,
        "scorer": served if by_model else None,
        "weights": by_model.get(served, {}),
        "weights_by_model": by_model,
        "events": {half: {sl.name: len(sl.events) for sl in slices} for half, slices in halves.items()},
        "ranks": {
            half: {sl.name: {a: r.tolist() for a, r in sl.ranks.items()} for sl in slices}
            for half, slices in halves.items()
        },
    }


def _reused(
    previous: dict[str, Any] | None, scorers: Sequence[str], halves: dict[str, list[Slice]], info: dict[str, Any]
) -> dict[str, Any]:
    """Copy ``scorers``' arms, weights and info from ``previous`` into this seed's slices."""
    if not previous:
        return {}
    for scorer in scorers:
        _reuse_arms(previous, [llm_arm(scorer), fused_arm(scorer)], halves)
        for key in ("llm", "adapter"):
            if scorer in previous["info"].get(key, {}):
                info.setdefault(key, {})[scorer] = previous["info"][key][scorer]
    return {scorer: previous["weights_by_model"][scorer] for scorer in scorers}


def _llm_arms(
    cfg: PipelineConfig,
    cs: ColdStartConfig,
    catalog: Catalog,
    split: ColdSplit,
    retriever: SASRec,
    halves: dict[str, list[Slice]],
    info: dict[str, Any],
    scorers: Sequence[str],
    work: Path,
    timer: StageTimer,
) -> dict[str, Any]:
    """Score every slice's top-K lists with each scorer (prior removed), then choose and apply its weights."""
    from transformers import AutoTokenizer

    from training.base_preferences import model_folder
    from training.engines import policy

    model_dir = model_folder(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_cfg = replace(prompt_config(cfg), max_recent=cs.recent_items, max_preference_chars=cs.preference_chars)
    labels = candidate_labels(tokenizer, cs.rerank_k)
    weights = {ZERO_SHOT: EngineWeights(str(model_dir))}
    if SFT in scorers or TRAINED in scorers:
        rc = adapter_settings(cfg, cs, cfg.retriever.seed)
        train = protocol_lists(rc, catalog, split, retriever, labels, prompt_cfg)
        adapter_dirs = _trained_adapters(model_dir, rc, train, work, timer, info, retrain=TRAINED in scorers)
        # both trained again (the SFT adapter on disk could not be reused): the new SFT+DPO scores too, replacing
        # the reused arms that an adapter no longer on disk scored
        scorers = [*scorers, *(s for s in adapter_dirs if s not in scorers)]
        for scorer in (SFT, TRAINED):
            if scorer in scorers:
                weights[scorer] = policy(cfg, model_dir, adapter_dirs[scorer], work)
    prompts = ScoringPrompts(tokenizer, prompt_cfg)
    examples: dict[tuple[str, str], list[RerankExample]] = {}
    calibration = shifts(cs.rerank_k, cs.calibration_shifts)
    for half, slices in halves.items():
        for sl in slices:
            ex = examples[half, sl.name] = _examples(sl, catalog, cs.rerank_k, labels, prompt_cfg)
            if half == "valid":
                prompts.add(f"calibration/{sl.name}", ex[: cs.calibration_lists], calibration)
            prompts.add(f"{half}/{sl.name}", ex, [0])
    log.info("cold start: %d prompts for each of %s", len(prompts.prompts), ", ".join(scorers))
    jobs = [EngineJob.score(prompts.prompts, prompts.label_ids, weights[m]) for m in scorers]
    with timer(f"score_{cfg.retriever.seed}"):
        raws = run_isolated(engine_jobs, engine_cfg(cfg), jobs)
    for scorer in scorers:
        if weights[scorer].model != str(model_dir):
            shutil.rmtree(weights[scorer].model, ignore_errors=True)  # a merged copy (~0.5 GB); the adapter stays
    chosen: dict[str, Any] = {}
    for scorer, raw in zip(scorers, raws, strict=True):
        blocks = [b for sl in halves["valid"] for b in prompts.split(raw, f"calibration/{sl.name}")]
        spec = ScoringSpec(weight=None, log_prior=tuple(estimate_prior(blocks)), permutations=1)
        info.setdefault("llm", {})[scorer] = {
            "prompts": len(prompts.prompts),
            "model": cfg.llm.model,
            "label_prior": list(spec.log_prior or ()),
        }
        scores = {
            key: [item_logprobs(per, [0], spec) for per in prompts.split(raw, f"{key[0]}/{key[1]}")] for key in examples
        }
        chosen[scorer] = _fuse(cs, halves, examples, scores, scorer)
    return chosen


def lists_digest(train: Sequence[RerankExample]) -> str:
    """What the adapters were trained on, as a digest (a reused adapter must come from the same lists)."""
    return hashlib.sha256(json.dumps([asdict(e) for e in train], sort_keys=True, default=str).encode()).hexdigest()


def _trained_adapters(
    model_dir: Path,
    rc: RerankSection,
    train: Sequence[RerankExample],
    work: Path,
    timer: StageTimer,
    info: dict[str, Any],
    retrain: bool,
) -> dict[str, Path]:
    """Each trained scorer's adapter. SFT and DPO are trained together (DPO continues SFT's adapter). When only
    SFT is wanted (SFT+DPO's arms reused: the seed's base arms matched, so the same SASRec drew the same lists),
    the SFT adapter on disk is taken if its settings are these and its lists' digest, where one was written, is
    these lists'; else both are trained again."""
    sft_dir, digest, digest_file = work / "rerank_sft", lists_digest(train), work / "lists.sha256"
    sft_cfg = sft_dir / "train_config.json"
    kept = (
        not retrain
        and (sft_dir / "adapter").exists()
        and sft_cfg.exists()
        and json.loads(sft_cfg.read_text()) == json.loads(json.dumps(asdict(rc.sft)))
        and (not digest_file.exists() or digest_file.read_text().strip() == digest)
    )
    if kept:
        lists = "digest matched" if digest_file.exists() else "no digest then: the base arms' match stands for it"
        log.info("cold start: the SFT adapter in %s reused (its settings; lists: %s)", sft_dir, lists)
        return {SFT: sft_dir / "adapter"}
    adapters = fit_adapters(model_dir, rc, train, work, timer)
    atomic_write_text(digest_file, digest + "\n")
    info.setdefault("adapter", {})[TRAINED] = adapters.info() | {
        "lists": len(train),
        "cold_kind": rc.cold_lists,
        "curves": adapters.curves(),
    }
    return {SFT: adapters.sft.adapter_dir, TRAINED: adapters.dpo.adapter_dir}


def _fuse(
    cs: ColdStartConfig,
    halves: dict[str, list[Slice]],
    examples: dict[tuple[str, str], list[RerankExample]],
    llm_scores: dict[tuple[str, str], list[np.ndarray]],
    scorer: str,
) -> dict[str, Any]:
    """The scorer's own order and its fused order per slice, the weight chosen on the validation half."""
    chosen: dict[str, Any] = {}
    for name in [sl.name for sl in halves["valid"]]:
        grids = {}
        for half in HALVES:
            sl = next((s for s in halves[half] if s.name == name), None)
            if sl is None:
                continue
            ex, scores = examples[half, name], llm_scores[half, name]
            sl.ranks[llm_arm(scorer)] = _llm_ranks(sl, ex, scores)
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
                sl.ranks[fused_arm(scorer)] = grids[half][f"w={weight:g}"]
    return chosen


def summarize(seeds: Sequence[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """Per slice and arm on the test half: NDCG@10 and Recall@10 (mean and spread over seeds), and the paired
    bootstrap CI of each arm against the best non-LLM arm on per-event metrics averaged over the seeds; and of
    each of ``CONTRASTS`` present."""
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
        pairs = {
            f"{a} vs {b}": M.bootstrap_diff(per_event[a]["NDCG@10"], per_event[b]["NDCG@10"], n_boot=n_boot)
            for a, b in CONTRASTS
            if a in per_event and b in per_event
        }
        out[name] = {"events": seeds[0]["events"]["test"][name], "best_non_llm": best, "rows": rows, "pairs": pairs}
    return out


def run_protocol(
    cfg: PipelineConfig, cs: ColdStartConfig, seeds: Sequence[int], out: Path | None = None
) -> dict[str, Any]:
    """Every seed (each written to ``out/seed_N.json`` when it finishes; an earlier file's scorers reused, see the
    module text), then the test summary."""
    timer = StageTimer()
    memo: dict[str, np.ndarray] = {}  # the text arms' encodings: the same item and preference texts every seed
    results = []
    work = (out or Path(tempfile.mkdtemp(prefix="cold-start-"))) / "work"  # adapters, the LLM texts' cache
    for seed in seeds:
        path = out / f"seed_{seed}.json" if out is not None else None
        previous = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.exists() else None
        result = run_seed(cfg, cs, seed, timer, work, previous, memo)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result))
        results.append(result)
    return {
        "config": asdict(cs),
        "seeds": list(seeds),
        "dataset": cfg.data.name,
        "test": summarize(results, cs.bootstrap),
        "per_seed": results,
        "stage_seconds": timer.seconds,
    }
