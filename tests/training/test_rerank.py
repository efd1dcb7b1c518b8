"""training.rerank: candidate lists (with the seeded insertion of a missed target), SFT/DPO rows, label
tokens as TRL tokenizes them, the transformers label scorer against vLLM's, and an SFT smoke run.

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
from llm.prompts import PromptConfig, render
from retrieval.catalog import Catalog, Item
from training.rerank import (
    RerankExample,
    build_examples,
    candidate_list,
    dpo_rows,
    hf_label_logprobs,
    order_stats,
    rerank_order,
    retrieve,
    sft_rows,
    validation_examples,
)
from training.split import Split, UserSplit

TOLERANCE = 0.02
GENRES = ("Comedy", "Horror", "Drama", "Action")


def catalog(n: int = 30) -> Catalog:
    return Catalog(Item(str(i), f"Film {i}", (GENRES[i % 4],), 1980 + i) for i in range(1, n + 1))


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- candidate lists --------------------------------------------------------------------------------


def test_a_retrieved_target_keeps_its_place() -> None:
    shown, position, inserted = candidate_list("u", [5, 6, 7, 8, 9], target=7, k=4, insert_target=True, seed=0)
    assert (shown, position, inserted) == ([5, 6, 7, 8], 2, False)


def test_a_missed_target_is_inserted_at_a_seeded_position_for_training_only() -> None:
    ranked = list(range(10, 30))
    shown, position, inserted = candidate_list("u1", ranked, target=3, k=8, insert_target=True, seed=0)
    assert inserted and len(shown) == 8 and shown[position] == 3
    assert [i for i in shown if i != 3] == ranked[:7]  # the retriever's order is kept around it
    assert candidate_list("u1", ranked, 3, 8, True, seed=0) == (shown, position, inserted)  # deterministic
    positions = {candidate_list(f"user{i}", ranked, 3, 8, True, seed=0)[1] for i in range(40)}
    assert len(positions) > 3  # seeded per user, not one fixed slot
    assert candidate_list("u1", ranked, 3, 8, insert_target=False, seed=0) == (ranked[:8], None, False)
    with pytest.raises(ValueError, match="fewer than k"):
        candidate_list("u1", ranked[:3], 3, 8, True, 0)


def test_retrieve_is_the_retrievers_top_k_without_seen_items() -> None:
    from test_reward import controlled_sasrec, pref  # same directory: the SASRec whose scores we set

    model = controlled_sasrec()
    prefs = {"a": pref([6, 5, 4, 3, 2, 1]), "b": pref([1, 2, 3, 4, 5, 6])}
    got = retrieve(model, {"a": [1], "b": [6, 2]}, prefs, ["a", "b"], k=3)
    assert got == {"a": [2, 3, 4], "b": [5, 4, 3]}


# ---- examples, rows and label tokens ----------------------------------------------------------------


@pytest.fixture(scope="module")
def examples(smollm2_tokenizer: Any) -> list[RerankExample]:
    labels = candidate_labels(smollm2_tokenizer, 6)
    split = Split(
        users={
            "hit": UserSplit(train=[1, 2, 3], valid=12, test=29, train_ratings=[4.0, 5.0, 3.0]),
            "miss": UserSplit(train=[4, 5], valid=2, test=30, train_ratings=[2.0, 4.0]),
        },
        dropped_users=0,
    )
    ranked = {"hit": [10, 11, 12, 13, 14, 15, 16], "miss": [20, 21, 22, 23, 24, 25, 26]}
    return validation_examples(
        catalog(), split, ["hit", "miss"], ranked, {"hit": "Likes comedy."}, labels, PromptConfig(max_recent=2)
    )


def test_training_examples_target_the_validation_item(examples: list[RerankExample]) -> None:
    hit, miss = examples
    assert hit.target == 12 and hit.target_position == 2 and not hit.inserted and hit.target_label == "C"
    assert miss.target == 2 and miss.inserted and miss.candidates[miss.target_position] == 2
    text = hit.messages[-1]["content"]
    assert "Likes comedy." in text and "Film 3" in text and "Film 29" not in text  # never the test item
    assert "Film 12" in text and "C. Film 12" in text


def test_sft_and_dpo_rows(examples: list[RerankExample]) -> None:
    hit, miss = examples
    assert [r["completion"] for r in sft_rows(examples)] == [hit.target_label, miss.target_label]
    rows = dpo_rows(examples)
    # rejected: the retriever's highest-ranked wrong candidate
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("C", "A")
    expected_negative = "B" if miss.target_position == 0 else "A"
    assert (rows[1]["chosen"], rows[1]["rejected"]) == (miss.target_label, expected_negative)
    assert all(r["prompt"] is e.messages for r, e in zip(rows, examples, strict=True))


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


def scoring_prompts(tokenizer: Any, n: int = 5, k: int = 20) -> tuple[list[str], list[list[int]]]:
    labels = candidate_labels(tokenizer, k)
    cat = catalog(60)
    prompts, ids = [], []
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
    return prompts, ids


def test_hf_label_scores_agree_with_vllm(llm_engine: Any, tiny_llm_dir: Path, smollm2_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from llm.engine import score_labels

    prompts, ids = scoring_prompts(smollm2_tokenizer)
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
        dpo_rows(sft_run["examples"]),
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
