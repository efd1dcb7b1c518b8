"""The cold-start protocol: nothing held out reaches a training input, the halves are disjoint, events see
only the past, and the fusion weight of a slice is read off validation alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import ranking_metrics as M
from training.cold_split import cold_split, held_out_items
from training.cold_start import _choose_weight


def _interactions(users: int = 60, items: int = 50, seed: int = 0) -> pd.DataFrame:
    """Item i is released at time 10 * i: later items first appear later. Each user rates 12 released items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = int(rng.integers(0, 300))
        picked = sorted(rng.choice(items, size=12, replace=False) + 1, key=lambda i: max(10 * i, start))
        for n, i in enumerate(picked):
            rows.append((f"u{u}", int(i), 4.0, max(10 * int(i), start) + n))
    return pd.DataFrame(rows, columns=["user_id", "item", "rating", "timestamp"])


def test_nothing_held_out_reaches_training_and_events_see_only_the_past():
    frame = _interactions()
    split = cold_split(frame, num_items=50, item_share=0.2, user_share=0.2, ks=(1, 3), seed=0)
    held = {int(i) for half in split.new_items.values() for i in half}
    assert held == set(held_out_items(frame, 0.2)) and len(held) == 10
    first_seen = frame.sort_values("timestamp", kind="stable").drop_duplicates("item")["item"].tolist()
    assert held == set(first_seen[-10:])  # the latest to appear
    assert not set(split.new_items["valid"]) & set(split.new_items["test"])
    new_users = set(split.new_users["valid"]) | set(split.new_users["test"])
    assert not set(split.new_users["valid"]) & set(split.new_users["test"]) and len(new_users) == 12
    # no held-out item or user in any training sequence (what SASRec and the content maps are fit on)
    assert not split.training_items() & held and not set(split.train.users) & new_users
    assert not split.known[list(held)].any() and not split.known[0]
    for half, events in split.item_events.items():
        assert events
        for e in events:
            assert e.target in set(split.new_items[half]) and not set(e.history) & held and e.user not in new_users
            past = frame[(frame.user_id == e.user)].sort_values("timestamp", kind="stable")["item"].tolist()
            assert list(e.history) == past[: len(e.history)] and past[len(e.history)] == e.target
    for k, halves in split.user_events.items():
        for half, events in halves.items():
            assert all(len(e.history) == k and e.user in split.new_users[half] for e in events)
            assert all(split.known[e.target] and split.known[list(e.history)].all() for e in events)


def test_the_weight_is_chosen_on_validation_and_must_clear_a_paired_ci():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 30, size=400)
    better = np.maximum(base - 5, 0)  # the LLM moves every target up: a gain the CI supports
    valid = {"w=0": base, "w=0.5": better, "w=1": base}
    weight, detail = _choose_weight(valid, (0.0, 0.5, 1.0), n_boot=500)
    assert weight == 0.5 and detail["gain"]["ci_low"] > 0
    noisy = base.copy()
    noisy[:3] = 0  # a gain on 3 of 400 lists: best on validation, but the CI spans 0
    weight, detail = _choose_weight({"w=0": base, "w=0.5": noisy, "w=1": base}, (0.0, 0.5, 1.0), n_boot=500)
    assert detail["best"] == 0.5 and weight == 0.0
    assert M.per_user(noisy)["NDCG@10"].mean() > M.per_user(base)["NDCG@10"].mean()


def _tiny_protocol(tmp_path):
    """The tiny generated data set (tests/training/tiny.py) split by the protocol, and an untrained SASRec."""
    from tiny import write_tiny_dataset

    from retrieval.sasrec import SASRec, SASRecConfig
    from training.data import load_dataset

    dataset = load_dataset(str(write_tiny_dataset(tmp_path / "tiny", users=40, items=80)), tmp_path / "cache")
    split = cold_split(dataset.interactions, len(dataset.catalog), item_share=0.2, user_share=0.2, ks=(1, 3), seed=0)
    return dataset, split, SASRec(SASRecConfig(num_items=len(dataset.catalog), hidden=16, max_len=12))


def test_the_adapters_lists_hold_no_held_out_item_or_user(tmp_path, smollm2_tokenizer):
    """The re-rank adapter the protocol trains (SFT and DPO rows come from these lists) never sees a held-out
    item, as candidate or history, nor a held-out user; both kinds of list are there, with the stand-in text."""
    from llm.labels import candidate_labels
    from llm.prompts import PromptConfig
    from training.cold_start import protocol_lists
    from training.config import RerankSection
    from training.rerank import dpo_rows, sft_rows, stand_in_text

    dataset, split, model = _tiny_protocol(tmp_path)
    held = {int(i) for half in split.new_items.values() for i in half}
    new_users = {u for half in split.new_users.values() for u in half}
    rc = RerankSection(k=8, train_lists=12, cold_lists=6, positions_per_user=2, cold_items=3)
    prompt_cfg = PromptConfig(max_recent=3, max_preference_chars=150)
    lists = protocol_lists(rc, dataset.catalog, split, model, candidate_labels(smollm2_tokenizer, 8), prompt_cfg)
    assert len(lists) == 18
    for e in lists:
        assert e.user_id not in new_users and len(e.candidates) == 8
        assert not set(e.candidates) & held
        assert e.target in e.candidates and e.target in split.train.users[e.user_id].train
    cold = lists[12:]
    assert all(len(e.recent) <= 3 for e in cold)
    for n, e in enumerate(lists):  # the preference: the history text of the prefix (its newest 3: cold kind)
        seq = split.train.users[e.user_id].train
        prefixes = [seq[max(0, t - 3) if n >= 12 else 0 : t] for t in range(1, len(seq)) if seq[t] == e.target]
        assert e.preference in {stand_in_text(dataset.catalog, p, prompt_cfg) for p in prefixes}
    rows = sft_rows(lists) + dpo_rows(lists, 1, 0)
    titles = {dataset.catalog[i].title for i in held}
    assert not any(t in str(row) for row in rows for t in titles)


def test_the_sft_adapter_on_disk_is_reused_only_for_its_lists_and_settings(tmp_path, smollm2_tokenizer, monkeypatch):
    """Scoring SFT beside a reused SFT+DPO: the adapter trained with it is taken when its settings and lists'
    digest are this seed's; a changed list or setting trains both again (here: the trainer is reached)."""
    import json
    from dataclasses import asdict, replace

    from llm.labels import candidate_labels
    from llm.prompts import PromptConfig
    from training import cold_start as cs
    from training.config import RerankSection
    from training.stages import StageTimer

    dataset, split, model = _tiny_protocol(tmp_path)
    rc = RerankSection(k=8, train_lists=6, cold_lists=2, positions_per_user=2, cold_items=3)
    lists = cs.protocol_lists(rc, dataset.catalog, split, model, candidate_labels(smollm2_tokenizer, 8), PromptConfig())
    work = tmp_path / "work"
    (work / "rerank_sft" / "adapter").mkdir(parents=True)
    (work / "rerank_sft" / "train_config.json").write_text(json.dumps(asdict(rc.sft)))
    (work / "lists.sha256").write_text(cs.lists_digest(lists) + "\n")

    class Trained(Exception):
        pass

    def trains(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(cs, "fit_adapters", trains)
    timer = StageTimer()
    kept = cs._trained_adapters(Path("base"), rc, lists, work, timer, {}, retrain=False)
    assert kept == {cs.SFT: work / "rerank_sft" / "adapter"}
    changed = [replace(lists[0], target=lists[0].candidates[1]), *lists[1:]]
    assert cs.lists_digest(changed) != cs.lists_digest(lists)
    for args in [(rc, changed, False), (replace(rc, sft=replace(rc.sft, learning_rate=1.0)), lists, False),
                 (rc, lists, True)]:  # fmt: skip
        with pytest.raises(Trained):
            cs._trained_adapters(Path("base"), args[0], args[1], work, timer, {}, retrain=args[2])


def test_preference_texts_come_from_the_events_past_and_the_warm_training_part(tmp_path):
    """The no-LLM control's texts (the LLM's come from the same histories): per warm user the training part,
    per event its own history, so no text names an event's target or a held-out item."""
    from training.cold_start import event_key, preference_texts
    from training.config import from_dict

    dataset, split, _ = _tiny_protocol(tmp_path)
    cfg = from_dict({"data": {"name": "tiny"}, "llm": {"history_items": 30}})
    texts = preference_texts(cfg, dataset, split, "history", tmp_path / "unused.json")
    titles = {i: dataset.catalog[i].title + " (" for i in range(1, len(dataset.catalog) + 1)}
    held = {int(i) for half in split.new_items.values() for i in half}
    assert set(split.train.users) <= set(texts)
    for u, us in split.train.users.items():
        assert all(titles[i] in texts[u] for i in us.train[-5:])
        assert us.test in us.train or titles[us.test] not in texts[u]  # (the tiny data repeats some items)
    events = [e for half in ("valid", "test") for e in split.item_events[half]]
    events += [e for ks in split.user_events.values() for half in ("valid", "test") for e in ks[half]]
    assert events
    for e in events:
        text = texts[event_key(e)]
        assert all(titles[i] in text for i in e.history[-5:])
        assert e.target in e.history or titles[e.target] not in text
        assert not any(titles[i] in text for i in held)


def test_the_report_pairs_each_llm_step_with_the_arm_it_starts_from():
    """The LLM's own effect, paired per event: its preference text against the history lines it read, each
    re-rank training against its starting scorer; a contrast whose arm is missing is left out."""
    from training.cold_report import markdown
    from training.cold_start import PREFERENCE_ARMS, SFT, ZERO_SHOT, llm_arm, summarize

    rng = np.random.default_rng(0)
    base = rng.integers(0, 40, size=200)
    arms = {"SASRec": base, PREFERENCE_ARMS["history"]: np.maximum(base - 8, 0), PREFERENCE_ARMS["llm"]: base,
            llm_arm(ZERO_SHOT): base, llm_arm(SFT): base}  # fmt: skip
    fit = {"alpha": 1, "holdout_r2": 0.1}
    info = {"held_out_items": 1, "warm_items": 2, "content_tower": fit, "genre_decade": fit}
    seed = {
        "ranks": {"test": {"new users k=1": {a: r.tolist() for a, r in arms.items()}}},
        "events": {"test": {"new users k=1": 200}},
        "weights_by_model": {},
        "info": info,
    }
    table = summarize([seed], n_boot=300)["new users k=1"]
    pairs = table["pairs"]
    llm_vs_history = pairs[f"{PREFERENCE_ARMS['llm']} vs {PREFERENCE_ARMS['history']}"]
    assert llm_vs_history["ci_high"] < 0  # the history lines move targets up; the LLM's text does not
    assert pairs[f"{llm_arm(SFT)} vs {llm_arm(ZERO_SHOT)}"]["diff"] == 0
    assert not any(k.startswith("LLM (SFT+DPO") for k in pairs)  # not scored: no row
    assert table["best_non_llm"] == PREFERENCE_ARMS["history"]
    doc = {"dataset": "d", "seeds": [0], "test": {"new users k=1": table}, "per_seed": [seed], "stage_seconds": {}}
    md = markdown(doc)
    assert "What the LLM changes" in md and f"{PREFERENCE_ARMS['llm']} vs" in md


def _scored_lists(rng, n: int, k: int, signal: float):
    """``n`` re-rank lists of ``k`` with the retriever's scores falling by position and an LLM score that marks
    the target with strength ``signal`` (0: noise)."""
    from training.rerank import RerankExample

    positions = rng.integers(0, k, size=n)
    examples, scores = [], []
    for j, p in enumerate(positions):
        cand = list(range(1, k + 1))
        examples.append(RerankExample(f"u{j}", cand, [], [], cand[p], int(p), list(np.linspace(1, 0, k))))
        s = rng.normal(size=k)
        s[p] += signal
        scores.append(s)
    return positions, examples, scores


def test_the_fusion_weights_read_validation_only():
    """Changing every test event (targets, the LLM's scores) leaves each slice's weight and its validation
    detail unchanged; changing validation moves them (so the check can fail)."""
    from training.cold_split import Event
    from training.cold_start import ColdStartConfig, Slice, _fuse

    def run(valid_signal: float, test_seed: int) -> tuple[dict, np.ndarray]:
        rng = np.random.default_rng(0)
        halves, examples, scores = {}, {}, {}
        for half, n, signal, r in (
            ("valid", 300, valid_signal, rng),
            ("test", 120, 3.0, np.random.default_rng(test_seed)),
        ):
            positions, ex, sc = _scored_lists(r, n, 8, signal)
            sl = Slice("shelf", [Event(e.user_id, (), e.target) for e in ex], np.ones(9, bool))
            sl.ranks["content tower"] = positions
            halves[half], examples[half, "shelf"], scores[half, "shelf"] = [sl], ex, sc
        chosen = _fuse(ColdStartConfig(bootstrap=300), halves, examples, scores, "zero-shot")
        return chosen, halves["test"][0].ranks["fused (zero-shot, weight chosen on validation)"]

    chosen, test_ranks = run(valid_signal=3.0, test_seed=1)
    assert chosen["shelf"]["chosen"] > 0
    other, other_ranks = run(valid_signal=3.0, test_seed=2)
    assert other == chosen and not np.array_equal(other_ranks, test_ranks)
    noise, _ = run(valid_signal=0.0, test_seed=1)
    assert noise["shelf"]["chosen"] == 0 and noise != chosen
