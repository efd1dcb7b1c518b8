"""training.rerank: training lists (shuffled, negatives from a mix, never the prefix nor a validation or test
item), evaluation lists, SFT/DPO rows, label tokens as TRL tokenizes them, the transformers label scorer
against vLLM's (label log-probs and the fused score), and an SFT smoke run.

Tolerance for transformers vs vLLM label log-probs: 0.02 (max abs). Measured on the tiny bf16 model:
max 0.0015 with HF in float32, 0.0021 in bf16 (vLLM computes in bf16, HF in fp32 reads the same bf16
weights: the gap is bf16 activation rounding). The real SmolLM2-135M (30 layers) differs more, up to
0.19 (see training/rerank.py), so this tolerance is for the tiny model only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llm.labels import candidate_labels, parse_label
from llm.prompts import PromptConfig, history_text, render
from llm.scoring import ScoringSpec, fused_scores, item_logprobs, order
from retrieval.catalog import Catalog, Item
from rundir.items import prompt_items
from training.rerank import (
    RerankExample,
    dpo_rows,
    draw_list,
    evaluation_examples,
    hf_label_logprobs,
    list_positions,
    names_item,
    negative_counts,
    order_stats,
    rerank_order,
    retrieve,
    sft_rows,
    training_lists,
)

TOLERANCE = 0.02
GENRES = ("Comedy", "Horror", "Drama", "Action")


def catalog(n: int = 30) -> Catalog:
    return Catalog(Item(str(i), f"Film {i}", (GENRES[i % 4],), 1980 + i) for i in range(1, n + 1))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- training lists ---------------------------------------------------------------------------------


def test_negative_counts_split_k_minus_one_by_the_mix() -> None:
    assert negative_counts(10, 0.5, 0.25, 0.25) == (5, 2, 2)
    assert negative_counts(5, 1, 0, 0) == (4, 0, 0)
    assert sum(negative_counts(20, 0.3, 0.3, 0.4)) == 19
    with pytest.raises(ValueError, match="not all 0"):
        negative_counts(10, 0, 0, 0)


def test_target_label_is_uniform_and_negatives_avoid_the_prefix_and_held_out_items() -> None:
    """Over many seeded lists the target sits at every label about equally often; no negative is ever an item
    of the prefix, the target, or the user's validation/test item; the hard ones come first from the retriever."""
    k, n_items = 8, 60
    popularity = np.arange(n_items + 1, dtype=np.float64)
    counts = (4, 2, 1)  # hard, popular, uniform
    positions = []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        prefix, banned = {1, 2, 3, 40}, {50, 51}
        ranked = [2, 50, 10, 11, 40, 12, 13, 14, 15]  # the retriever's best first, seen/held-out items among them
        shown = draw_list(7, prefix | banned, ranked, popularity, counts, rng)
        assert len(shown) == k == len(set(shown)) and 7 in shown and 0 not in shown
        negatives = set(shown) - {7}
        assert not negatives & (prefix | banned)
        assert {10, 11, 12, 13} <= negatives  # the 4 hard negatives: the retriever's top wrong, unseen ones
        positions.append(shown.index(7))
    hist = np.bincount(positions, minlength=k) / len(positions)
    assert np.abs(hist - 1 / k).max() < 0.05, hist  # uniform within sampling noise (400 lists, 8 labels)


def test_list_positions_skip_targets_the_preference_names() -> None:
    cat = catalog()
    train = [1, 2, 3, 4, 5, 6]
    assert list_positions(cat, train, "Likes comedies.", 3) == [3, 4, 5]
    assert list_positions(cat, train, "Loved Film 6 and Film 5.", 3) == [1, 2, 3]  # items 5 and 6 are named
    assert list_positions(cat, [1, 2], "", 5) == [1]  # the prefix is never empty
    assert names_item("She loved the clash of the titans", "Clash of the Titans, The (1981)")
    assert not names_item("She loved comedies", "Clash of the Titans, The (1981)")


def test_training_lists_never_hold_a_validation_or_test_item(smollm2_tokenizer: Any) -> None:
    cat = catalog()
    labels = candidate_labels(smollm2_tokenizer, 6)
    train = {"u": [1, 2, 3, 4, 5, 6, 7, 8]}
    banned = {"u": [9, 10]}  # validation, test
    positions = [("u", t) for t in (5, 6, 7)]
    ranked = {f"u@{t}": [9, 10, 11, 12, 13, 14, 15, 16] for t in (5, 6, 7)}  # the retriever likes the held-out ones

    def build() -> list[RerankExample]:
        prefs, cfg, counts = {"u": "Likes comedy."}, PromptConfig(max_recent=2), negative_counts(6, 0.6, 0.2, 0.2)
        return training_lists(cat, positions, train, banned, ranked, np.ones(31), prefs, labels, cfg, counts, seed=0)

    lists = build()
    for (_, t), e in zip(positions, lists, strict=True):
        assert e.target == train["u"][t] and e.candidates[e.target_position] == e.target
        assert not set(e.candidates) & {9, 10} and not set(e.candidates) & (set(train["u"][:t]) - {e.target})
        text = e.messages[-1]["content"]
        assert f"Film {train['u'][t - 1]}" in text and "Likes comedy." in text  # the prefix's newest item
        assert f"{e.target_label}. Film {e.target}" in text
    assert [e.candidates for e in build()] == [e.candidates for e in lists]  # seeded: rebuilt lists are the same


def test_cold_kind_shows_the_newest_cut_items_and_their_history_text(smollm2_tokenizer: Any) -> None:
    cat, cfg = catalog(), PromptConfig(max_recent=1)
    train, banned, positions = {"u": [1, 2, 3, 4, 5, 6, 7, 8]}, {"u": [9, 10]}, [("u", t) for t in (5, 6, 7)]
    no_hard = {f"u@{t}": [] for _, t in positions}
    labels = candidate_labels(smollm2_tokenizer, 6)
    lists = training_lists(cat, positions, train, banned, no_hard, np.ones(31), {}, labels, cfg, (0, 0, 5), 0, cut=2)
    for (_, t), e in zip(positions, lists, strict=True):
        assert e.preference == history_text(prompt_items(cat, train["u"][t - 2 : t]), cfg)
        assert [i.title for i in e.recent] == [f"Film {train['u'][t - 1]}"]
        assert not set(e.candidates) & {9, 10, *train["u"][:t]} and e.candidates[e.target_position] == e.target


def test_retrieve_is_the_retrievers_top_k_without_seen_items() -> None:
    from test_reward import controlled_sasrec, pref  # same directory: the SASRec whose scores we set

    model = controlled_sasrec()
    prefs = {"a": pref([6, 5, 4, 3, 2, 1]), "b": pref([1, 2, 3, 4, 5, 6])}
    got = retrieve(model, {"a": [1], "b": [6, 2]}, prefs, ["a", "b"], k=3)
    assert {u: items for u, (items, _) in got.items()} == {"a": [2, 3, 4], "b": [5, 4, 3]}
    assert all(scores == sorted(scores, reverse=True) for _, scores in got.values())
    banned = retrieve(model, {"a": [1]}, prefs, ["a"], k=3, banned={"a": [3]})
    assert banned["a"][0] == [2, 4, 5]


# ---- evaluation lists, rows and label tokens --------------------------------------------------------


@pytest.fixture(scope="module")
def examples(smollm2_tokenizer: Any) -> list[RerankExample]:
    labels = candidate_labels(smollm2_tokenizer, 6)
    histories = {"hit": [1, 2, 3], "miss": [4, 5]}
    retrieved = {
        "hit": ([10, 11, 12, 13, 14, 15, 16], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]),
        "miss": ([20, 21, 22, 23, 24, 25, 26], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]),
    }
    return evaluation_examples(
        catalog(),
        ["hit", "miss"],
        histories,
        {"hit": 12, "miss": 2},
        retrieved,
        {"hit": "Likes comedy."},
        labels,
        PromptConfig(max_recent=2),
    )


def test_evaluation_lists_keep_the_retrievers_order_and_never_insert(examples: list[RerankExample]) -> None:
    hit, miss = examples
    assert hit.target == 12 and hit.target_position == 2 and hit.target_label == "C"
    assert hit.candidates == [10, 11, 12, 13, 14, 15] and hit.retriever_scores == [7.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    assert miss.target_position is None and 2 not in miss.candidates
    text = hit.messages[-1]["content"]
    assert "Likes comedy." in text and "Film 3" in text and "Film 1 " not in text  # max_recent=2
    assert "C. Film 12" in text
    shifted = hit.shifted_messages(1, PromptConfig(max_recent=2))[-1]["content"]
    assert "A. Film 11" in shifted and "F. Film 10" in shifted  # cyclic shift: position p shows item p+1


def test_sft_and_dpo_rows(examples: list[RerankExample]) -> None:
    hit, miss = examples
    assert [r["completion"] for r in sft_rows(examples)] == [hit.target_label]  # a missed target trains nothing
    rows = dpo_rows(examples, rejected=3, seed=0)
    assert len(rows) == 3 and {r["chosen"] for r in rows} == {"C"}
    assert len({r["rejected"] for r in rows}) == 3 and "C" not in {r["rejected"] for r in rows}
    assert all(r["prompt"] is hit.messages for r in rows)
    # over many lists the rejected label is spread over the wrong positions, not always the retriever's top
    many = [RerankExample(f"u{i}", hit.candidates, hit.labels, hit.messages, 12, 2) for i in range(200)]
    rejected = [r["rejected"] for r in dpo_rows(many, rejected=1, seed=0)]
    assert set(rejected) == {"A", "B", "D", "E", "F"} and rejected.count("A") < 80


def test_every_label_is_the_first_completion_token_as_trl_tokenizes_it(
    smollm2_tokenizer: Any, examples: list[RerankExample]
) -> None:
    # TRL tokenizes prompt + assistant answer with the chat template; serving renders the prompt and reads
    # the next token. Both must see the label as that one token, for every label.
    example = examples[0]
    prompt_ids = encode(smollm2_tokenizer, render(smollm2_tokenizer, example.messages))
    for position, (text, token_id) in enumerate(example.labels):
        full = smollm2_tokenizer.apply_chat_template(
            [*example.messages, {"role": "assistant", "content": text}], tokenize=True, return_dict=True
        )["input_ids"]
        assert full[: len(prompt_ids) + 1] == [*prompt_ids, token_id], text
        assert parse_label(token_id, example.labels) == position
        assert parse_label(smollm2_tokenizer.decode([token_id]), example.labels) == position


def test_rerank_order_is_stable() -> None:
    assert rerank_order([0.1, 0.5, 0.5, float("nan"), 0.2], [10, 11, 12, 13, 14]) == [11, 12, 14, 10, 13]
    with pytest.raises(ValueError, match="scores for"):
        rerank_order([0.1], [1, 2])


def test_order_stats_tell_position_following_from_target_finding() -> None:
    keeps_order = [[-1.0, -2.0, -3.0], [-0.5, -0.6, -0.7]]  # scores fall with position: the retriever's order
    stats = order_stats(keeps_order, [2, 1])
    assert stats["top_is_retrievers_top"] == 1.0 and stats["spearman_with_retriever"] == pytest.approx(1.0)
    assert stats["target_position_before"] == stats["target_position_after"] == 2.5
    finds = [[-3.0, -2.0, -1.0], [-2.0, -1.0, -3.0]]  # the target scored best each time
    stats = order_stats(finds, [2, 1])
    assert stats["top_is_retrievers_top"] == 0.0 and stats["target_position_after"] == 1.0
    assert stats["spearman_with_retriever"] == pytest.approx((-1.0 + 0.5) / 2)
    assert order_stats([], []) == {}
    with pytest.raises(ValueError, match="score lists for"):
        order_stats([[0.0]], [0, 1])


# ---- scoring: transformers vs vLLM, and SFT -----------------------------------------------------------


def build_examples(cat, users, histories, targets, ranked, prefs, labels, cfg) -> list[RerankExample]:
    """Evaluation lists from plain ranked items (scores falling with rank)."""
    retrieved = {u: (ranked[u], [float(-i) for i in range(len(ranked[u]))]) for u in users}
    return evaluation_examples(cat, users, histories, targets, retrieved, prefs, labels, cfg)


def scoring_prompts(tokenizer: Any, n: int = 5, k: int = 20) -> tuple[list[str], list[list[int]], list[RerankExample]]:
    labels = candidate_labels(tokenizer, k)
    cat = catalog(60)
    prompts, ids, examples = [], [], []
    for u in range(n):
        ranked = list(range(20 + u, 20 + u + k))
        (ex,) = build_examples(
            cat,
            [f"u{u}"],
            {f"u{u}": [1 + u, 2 + u, 3 + u]},
            {f"u{u}": ranked[u]},
            {f"u{u}": ranked},
            {f"u{u}": f"Likes {GENRES[u % 4].lower()}."},
            labels,
            PromptConfig(),
        )
        prompts.append(render(tokenizer, ex.messages))
        ids.append([i for _, i in ex.labels])
        examples.append(ex)
    return prompts, ids, examples


def test_hf_label_scores_agree_with_vllm(llm_engine: Any, tiny_llm_dir: Path, smollm2_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from llm.engine import score_labels

    prompts, ids, examples = scoring_prompts(smollm2_tokenizer)
    ours = np.stack(
        hf_label_logprobs(
            AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32), smollm2_tokenizer, prompts, ids
        )
    )  # (P, k)
    theirs = np.stack(score_labels(llm_engine, prompts, ids))  # (P, k)
    np.testing.assert_allclose(np.exp(ours).sum(axis=1), 1.0, atol=1e-6)  # a distribution over labels only
    assert np.abs(ours - theirs).max() < TOLERANCE
    # not vacuous: the scores vary across labels by much more than the tolerance, and the orders agree
    assert (ours.max(axis=1) - ours.min(axis=1)).min() > 10 * TOLERANCE
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()
    # the served score (prior removed, fused with the retriever) is the same function of either side's scores
    prior = tuple(np.log(np.linspace(2.0, 1.0, ours.shape[1]) / np.linspace(2.0, 1.0, ours.shape[1]).sum()))
    spec = ScoringSpec(weight=0.5, log_prior=prior)
    for e, a, b in zip(examples, ours, theirs, strict=True):
        fa = fused_scores(np.asarray(e.retriever_scores), item_logprobs([a], [0], spec), spec.weight)
        fb = fused_scores(np.asarray(e.retriever_scores), item_logprobs([b], [0], spec), spec.weight)
        # z-scoring divides a log-prob gap by the spread of the list (x2: the spread moves too)
        assert np.abs(fa - fb).max() < 2 * spec.weight * TOLERANCE / min(a.std(), b.std())
        assert order(fa)[0] == order(fb)[0]


@pytest.fixture(scope="module")
def sft_run(tiny_llm_dir: Path, smollm2_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A few SFT steps on four re-rank examples whose true labels are A or B."""
    from training.dpo import SFTTrainConfig, train_sft

    labels = candidate_labels(smollm2_tokenizer, 4)
    users = [f"u{i}" for i in range(4)]
    ranked = {u: list(range(10 + i, 16 + i)) for i, u in enumerate(users)}
    targets = {u: ranked[u][i % 2] for i, u in enumerate(users)}  # labels A and B
    examples = build_examples(
        catalog(), users, {u: [1, 2] for u in users}, targets, ranked, {}, labels, PromptConfig(max_recent=1)
    )
    cfg = SFTTrainConfig(
        learning_rate=5e-3,
        max_steps=6,
        batch_size=4,
        grad_accum=1,
        warmup=0,
        lr_scheduler="constant",
        max_length=512,
        max_prompt_length=480,
        lora_r=8,
        lora_alpha=16,
    )
    result = train_sft(tiny_llm_dir, sft_rows(examples), cfg, tmp_path_factory.mktemp("sft"), progress=False)
    return {"examples": examples, "result": result}


def true_label_logprob(model: Any, tokenizer: Any, examples: list[RerankExample]) -> float:
    prompts = [render(tokenizer, e.messages) for e in examples]
    scores = hf_label_logprobs(model, tokenizer, prompts, [[i for _, i in e.labels] for e in examples])
    return float(np.mean([s[e.target_position] for s, e in zip(scores, examples, strict=True)]))


def test_sft_raises_the_true_labels_log_prob(
    sft_run: dict[str, Any], tiny_llm_dir: Path, smollm2_tokenizer: Any
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    examples, result = sft_run["examples"], sft_run["result"]
    assert result.curves["loss"][-1] < result.curves["loss"][0]
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    before = true_label_logprob(base, smollm2_tokenizer, examples)
    after = true_label_logprob(PeftModel.from_pretrained(base, str(result.adapter_dir)), smollm2_tokenizer, examples)
    assert after > before + 0.05, (before, after)


def test_dpo_continues_the_sft_adapter_against_it_as_reference(
    sft_run: dict[str, Any], tiny_llm_dir: Path, tmp_path: Path
) -> None:
    from training.dpo import DPOTrainConfig, train_dpo

    cfg = DPOTrainConfig(
        learning_rate=5e-3,
        beta=0.1,
        max_steps=4,
        batch_size=4,
        grad_accum=1,
        warmup=0,
        lr_scheduler="constant",
        max_length=512,
        max_prompt_length=480,
    )
    result = train_dpo(
        tiny_llm_dir,
        dpo_rows(sft_run["examples"], rejected=1, seed=0),
        cfg,
        tmp_path,
        progress=False,
        init_adapter=sft_run["result"].adapter_dir,
    )
    margins = result.curves["rewards/margins"]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT adapter itself
    assert margins[-1] > margins[0]
    # one adapter on the base model (servable by vLLM multi-LoRA), not TRL's frozen "ref" copy
    assert not (result.adapter_dir / "ref").exists()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_vllm_serves_the_trained_adapter_with_the_same_scores(
    llm_engine: Any, sft_run: dict[str, Any], tiny_llm_dir: Path, smollm2_tokenizer: Any
) -> None:
    """The PEFT adapter as vLLM's LoRARequest: same label scores as transformers + PEFT.

    Needs a LoRA-enabled engine; the shared session engine is built without LoRA, so this skips unless
    the fixture enables it (checked by hand on this machine: max abs diff 0.0016, adapter effect 0.57).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm.engine import make_lora, score_labels

    vllm_config = getattr(getattr(llm_engine, "llm_engine", None), "vllm_config", None)
    if getattr(vllm_config, "lora_config", None) is None:
        pytest.skip("the session vLLM engine has LoRA disabled (EngineConfig.enable_lora)")
    examples = sft_run["examples"]
    prompts = [render(smollm2_tokenizer, e.messages) for e in examples]
    ids = [[i for _, i in e.labels] for e in examples]
    adapter = sft_run["result"].adapter_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    ours = np.stack(hf_label_logprobs(PeftModel.from_pretrained(base, str(adapter)), smollm2_tokenizer, prompts, ids))
    theirs = np.stack(score_labels(llm_engine, prompts, ids, lora=make_lora("rerank-test", adapter, 7)))
    assert np.abs(ours - theirs).max() < TOLERANCE


# ---- the job's lists and the fusion weight ----------------------------------------------------------


def _job_inputs(tests: dict[str, int], **rerank: Any) -> tuple[Any, Any]:
    """StageInputs/Served over 8 users of a 30-item catalog, a seeded untrained preference-fused SASRec;
    ``rerank``: settings over the job's."""
    from retrieval.sasrec import SASRec, SASRecConfig
    from training.config import from_dict
    from training.split import Split, UserSplit
    from training.stages import Served, StageInputs

    torch.manual_seed(0)
    retriever = SASRec(
        SASRecConfig(num_items=30, max_len=10, hidden=16, layers=1, heads=1, dropout=0.0, pref_dim=4)
    ).eval()
    users = [f"u{i}" for i in range(8)]
    split = Split(
        users={
            u: UserSplit(
                train=[(3 * i + j) % 30 + 1 for j in range(8)],
                valid=(3 * i + 8) % 30 + 1,
                test=tests[u],
                train_ratings=[4.0] * 8,
            )
            for i, u in enumerate(users)
        },
        dropped_users=0,
    )
    cfg = from_dict(
        {
            "rerank": {
                "enabled": True,
                "k": 5,
                "positions_per_user": 2,
                "train_lists": 6,
                "calibration_lists": 3,
                "cold_items": 0,
                "recent_items": 2,
                **rerank,
            }
        }
    )
    vectors = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    texts = {u: "Likes comedies." for u in users}
    unused = dict.fromkeys(("model_dir", "encoder", "ranks"))
    inp = StageInputs(
        cfg=cfg,
        catalog=catalog(30),
        split=split,
        users=users,
        texts=texts,
        vectors=vectors,
        retriever=retriever,
        **unused,
    )
    return inp, Served("SASRec + base-LLM preferences", texts, vectors, retriever, np.zeros(8, dtype=np.int64))


def test_job_lists_hold_no_held_out_item_and_validation_lists_ignore_the_test_items(smollm2_tokenizer: Any) -> None:
    from training.rerank_training import rerank_lists

    first = {f"u{i}": (3 * i + 9) % 30 + 1 for i in range(8)}
    second = {f"u{i}": (3 * i + 20) % 30 + 1 for i in range(8)}  # other test items, everything else equal
    inp, out = _job_inputs(first)
    a = rerank_lists(inp, smollm2_tokenizer, out)
    inp_b, out_b = _job_inputs(second)
    b = rerank_lists(inp_b, smollm2_tokenizer, out_b)
    assert len(a.train) == 6 and len(a.calibration) == 3 and len(a.valid) == len(a.test) == 8
    for e in [*a.train, *a.calibration]:
        held_out = {inp.split.users[e.user_id].valid, inp.split.users[e.user_id].test}
        assert not set(e.candidates) & held_out and e.target in inp.split.users[e.user_id].train
    # the validation lists, which alone choose the fusion weight (choose_weight reads nothing else), are the
    # same whatever the test items are; the training lists only avoid them as negatives, by design
    assert [(e.candidates, e.retriever_scores) for e in a.valid] == [
        (e.candidates, e.retriever_scores) for e in b.valid
    ]
    assert [(e.user_id, e.target) for e in a.train] == [(e.user_id, e.target) for e in b.train]


def test_cold_lists_are_the_cold_slices_prompt_with_uniform_negatives(smollm2_tokenizer: Any) -> None:
    """rerank.cold_lists adds lists of the cold kind to the training lists, from positions neither trained nor
    calibrated on: the newest items only, their history text as the preference, negatives never from the
    history nor the validation/test items, the target's label spread; every other list stays as with 0."""
    from training.rerank_training import COLD_TRAIN_ITEMS, _lists_info, rerank_lists
    from training.stages import prompt_config

    tests = {f"u{i}": (3 * i + 9) % 30 + 1 for i in range(8)}
    inp_0, out_0 = _job_inputs(tests, positions_per_user=4)  # 32 positions: 6 train, 3 calibrate, 23 spare
    base = rerank_lists(inp_0, smollm2_tokenizer, out_0)
    inp, out = _job_inputs(tests, positions_per_user=4, cold_lists=20)
    got = rerank_lists(inp, smollm2_tokenizer, out)
    assert base.cold_train == 0 and got.cold_train == 20 and len(got.train) == len(base.train) + 20
    assert _lists_info(got, inp.cfg.rerank)["cold_train_lists"] == 20

    def shown(lists: list[RerankExample]) -> list[tuple[str, list[int], int | None, str]]:
        return [(e.user_id, e.candidates, e.target_position, e.preference) for e in lists]

    warm, cold = got.train[:-20], got.train[-20:]
    assert shown(warm) == shown(base.train) and shown(got.calibration) == shown(base.calibration)
    assert shown(got.valid) == shown(base.valid) and shown(got.test) == shown(base.test)
    used = {(e.user_id, e.target) for e in [*base.train, *base.calibration]}
    prompt_cfg = prompt_config(inp.cfg)
    for e in cold:
        user = inp.split.users[e.user_id]
        prefix = user.train[: user.train.index(e.target)]
        assert (e.user_id, e.target) not in used and len(prefix) > COLD_TRAIN_ITEMS
        newest = prompt_items(inp.catalog, prefix[-COLD_TRAIN_ITEMS:])
        assert e.preference == history_text(newest, prompt_cfg) != "Likes comedies."
        assert e.preference != history_text(prompt_items(inp.catalog, prefix[-COLD_TRAIN_ITEMS - 1 :]), prompt_cfg)
        assert not set(e.candidates) & {*prefix, user.valid, user.test}
        assert len(set(e.candidates)) == 5 and e.candidates[e.target_position] == e.target
    assert len({e.target_position for e in cold}) > 1  # shuffled: the label carries no signal


def test_fusion_weight_is_chosen_on_validation_lists_and_ties_go_to_zero(examples: list[RerankExample]) -> None:
    from training.rerank_training import choose_weight

    hit = examples[0]  # target at C (position 2), retriever scores falling with position
    finds = np.array([-3.0, -3.0, -0.1, -3.0, -3.0, -3.0])  # an LLM that puts the target first
    weight, curve = choose_weight([hit], [finds], [0.0, 0.5, 4.0])
    assert weight > 0 and curve[0] < max(curve)
    lost = np.array([-0.1, -0.2, -5.0, -0.3, -0.4, -0.5])  # an LLM that buries it
    assert choose_weight([hit], [lost], [0.0, 0.5, 4.0])[0] == 0.0
    flat = np.zeros(6)  # no opinion: every weight ties, the smallest wins
    assert choose_weight([hit], [flat], [1.0, 0.0, 2.0])[0] == 0.0
    assert choose_weight([], [], [0.0, 1.0]) == (0.0, [0.0, 0.0])


def test_the_job_builds_its_lists_from_a_plain_served_retriever(smollm2_tokenizer: Any) -> None:
    """Selection may serve plain SASRec (no preference vectors), and it is chosen before the re-rank job: the job's
    lists, and so the fusion weight chosen on them, then come from plain SASRec's own order."""
    from retrieval.sasrec import SASRec, SASRecConfig
    from training.rerank_training import rerank_lists
    from training.stages import Served

    inp, out = _job_inputs({f"u{i}": (3 * i + 9) % 30 + 1 for i in range(8)}, cold_items=2)
    torch.manual_seed(1)
    plain = SASRec(SASRecConfig(num_items=30, max_len=10, hidden=16, layers=1, heads=1, dropout=0.0)).eval()
    lists = rerank_lists(inp, smollm2_tokenizer, Served("SASRec", out.texts, out.vectors, plain, out.ranks))
    train = {u: inp.split.users[u].train for u in inp.users}
    want = retrieve(plain, train, None, inp.users, 5)
    assert [e.candidates for e in lists.valid] == [want[u][0] for u in inp.users]
    assert len(lists.train) == 6 and len(lists.cold) == 8 and lists.cold_ranks is not None
