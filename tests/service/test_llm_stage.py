"""The LLM stage of a request (``service.llm_stage``): each outcome and the flag it adds, on the real tiny engine
and real admission; at weight 0 the answer is the retriever's order and score; the benchmarks replay the
service's own prompts."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from llm.prompts import HistoryItem
from llm.scoring import ScoringSpec
from rundir.items import prompt_item
from service.admission import Admission
from service.language_model import LanguageModel
from service.llm_stage import LLMStage, LLMStageResult
from service.protocol import RerankRequest
from service.rerank_pipeline import RerankPipeline
from service.telemetry import ServiceMetrics
from tests.service.support import metric, run_async

USER = "u9"
SCORED = ScoringSpec(weight=1.0)  # fused with the retriever: the engine is called


def _items(app, indices: list[int]) -> list[HistoryItem]:
    catalog = app.state.service.artifacts.catalog
    return [prompt_item(catalog[i]) for i in indices]


def _inputs(app, k: int = 8) -> dict:
    """A request's inputs to the stage: the user's preference and history, a head of ``k`` catalog items with
    retriever scores (best first), a deadline a minute away."""
    art = app.state.service.artifacts
    text, _ = art.preference_of(USER)
    return {
        "preference": text,
        "history": _items(app, art.users[USER]),
        "head": _items(app, list(range(1, k + 1))),
        "retriever_scores": np.linspace(2.0, -1.0, k),
        "deadline": time.perf_counter() + 60.0,
        "request_id": "stage-test",
    }


def _counts(app) -> tuple[float, float]:
    """(engine calls for re-ranks, re-ranks scored)."""
    return metric(app, "dpo4rec_llm_calls_total", job="rerank"), metric(app, "dpo4rec_rerank_prompt_tokens_count")


def _run(client, stage: LLMStage, scoring: ScoringSpec, **inputs) -> LLMStageResult:
    return run_async(client, lambda: stage.run(**inputs, scoring=scoring))


def test_scored_gives_probabilities_over_the_head_and_its_prompt_tokens(client, app):
    stage, llm = app.state.service.pipeline.llm_stage, app.state.service.llm
    inputs = _inputs(app)
    calls, scored = _counts(app)
    result = _run(client, stage, SCORED, **inputs)
    assert (result.outcome, result.flag) == ("scored", None)
    assert result.probabilities is not None and result.probabilities.shape == (8,)
    assert result.probabilities.sum() == pytest.approx(1.0) and (result.probabilities >= 0).all()
    recent = inputs["history"][-llm.cfg.prompt.max_recent :]
    expected = llm.rerank_prompts(inputs["preference"], recent, inputs["head"], SCORED).total_tokens
    assert result.prompt_tokens == expected  # the prompts it built: the last max_recent history items shown
    assert _counts(app) == (calls + 1, scored + 1)


def test_weight_zero_and_a_single_candidate_are_skipped_without_an_engine_call(client, app):
    stage = app.state.service.pipeline.llm_stage
    before = _counts(app)
    at_zero = _run(client, stage, ScoringSpec(weight=0.0), **_inputs(app))
    alone = _run(client, stage, SCORED, **_inputs(app, k=1))
    for result in (at_zero, alone):
        assert (result.outcome, result.flag, result.probabilities) == ("skipped", None, None)
        assert result.prompt_tokens is None
    assert _counts(app) == before  # the engine was never asked


def test_shed_when_admission_predicts_a_late_finish_early_or_after_the_prompts(client, app):
    pipeline, llm = app.state.service.pipeline, app.state.service.llm
    late_check = LLMStage(llm, app.state.settings.model_copy(update={"admission_early": False}), app.state.metrics)
    before = _counts(app)

    async def shed() -> list[LLMStageResult]:
        rate = llm.admission.rate
        llm.admission.rate = 1.0  # a saturated engine: ~300 prompt tokens would take minutes, the deadline is 60 s
        try:
            return [await stage.run(**_inputs(app), scoring=SCORED) for stage in (pipeline.llm_stage, late_check)]
        finally:
            llm.admission.rate = rate

    for result in run_async(client, shed):
        assert (result.outcome, result.flag, result.probabilities) == ("shed", "llm_shed", None)
    assert _counts(app) == before and llm.admission.pending == 0  # no engine work queued, no ticket left


def test_timeout_when_the_deadline_has_passed(client, app):
    stage, llm = app.state.service.pipeline.llm_stage, app.state.service.llm
    before, rate = _counts(app), llm.admission.rate
    result = _run(client, stage, SCORED, **(_inputs(app) | {"deadline": time.perf_counter()}))
    assert (result.outcome, result.flag, result.probabilities) == ("timeout", "llm_timeout", None)
    assert _counts(app) == before  # given up before the engine
    assert llm.admission.rate == rate  # nothing was admitted: admission's rate is not blamed


def _queued_model(app) -> tuple[LanguageModel, LLMStage]:
    """The app's engine behind an admission with one engine slot, which a test can hold; its own metrics."""
    shared = app.state.service.llm
    metrics = ServiceMetrics()
    llm = LanguageModel(shared.engines, shared.tokenizer, shared.cfg, metrics, Admission(rate=1e6, slots=1))
    return llm, LLMStage(llm, app.state.settings, metrics)


def test_timeout_while_waiting_for_the_engine_tells_admission_it_was_late(client, app):
    llm, stage = _queued_model(app)
    reserve_s = app.state.settings.fallback_reserve_ms / 1000

    async def wait_behind_a_held_slot() -> LLMStageResult:
        async with llm.admission.engine_slot(0):  # the only slot is taken until the stage has given up
            deadline = time.perf_counter() + reserve_s + 0.5
            return await stage.run(**(_inputs(app) | {"deadline": deadline}), scoring=SCORED)

    result = run_async(client, wait_behind_a_held_slot)
    assert (result.outcome, result.flag, result.probabilities) == ("timeout", "llm_timeout", None)
    assert llm.admission.rate == pytest.approx(0.8e6)  # admitted yet late: the rate is cut (missed)
    assert stage.metrics.value("dpo4rec_llm_calls_total", {"job": "rerank"}) == 0  # the engine never saw it
    assert llm.admission.pending == 0


def test_timeout_when_the_engine_turn_comes_too_late(client, app):
    llm, stage = _queued_model(app)

    async def late_turn() -> LLMStageResult:
        slot = llm.admission.engine_slot(0)
        await slot.__aenter__()
        task = asyncio.ensure_future(stage.run(**_inputs(app), scoring=SCORED))
        for _ in range(500):  # until it is admitted (then it queues for the slot)
            if llm.admission.pending:
                break
            await asyncio.sleep(0.01)
        assert llm.admission.pending > 0
        llm.admission.rate = 1.0  # the engine turns out slow: ~300 tokens now need minutes, 60 s are left
        await slot.__aexit__(None, None, None)
        return await task

    result = run_async(client, late_turn)
    assert (result.outcome, result.flag) == ("timeout", "llm_timeout")  # ``Late``: given up before the engine
    assert llm.admission.rate == pytest.approx(0.5e6)  # missed: the cut stops at the floor, half the seed
    assert stage.metrics.value("dpo4rec_llm_calls_total", {"job": "rerank"}) == 0


def test_unavailable_when_the_prompts_or_the_scores_cannot_be_made(client, app):
    stage = app.state.service.pipeline.llm_stage
    calls, scored = _counts(app)
    too_many = _run(client, stage, SCORED, **_inputs(app, k=9))  # 8 labels prepared (rerank_k): no prompt
    assert (too_many.outcome, too_many.flag, too_many.probabilities) == ("unavailable", "llm_unavailable", None)
    assert _counts(app) == (calls, scored)
    short_prior = ScoringSpec(weight=1.0, log_prior=(0.0, 0.0))  # the engine answers; its 3 labels cannot be read
    failed = _run(client, stage, short_prior, **_inputs(app, k=3))
    assert (failed.outcome, failed.flag, failed.probabilities) == ("unavailable", "llm_unavailable", None)
    assert _counts(app) == (calls + 1, scored)  # one engine call, nothing scored


def test_disabled_without_an_llm(lite_client, lite_app):
    stage = lite_app.state.service.pipeline.llm_stage
    result = _run(lite_client, stage, ScoringSpec(weight=0.0), **_inputs(lite_app))
    assert (result.outcome, result.flag, result.probabilities) == ("disabled", "llm_disabled", None)


def test_weight_zero_answers_with_the_retrievers_scores_in_its_order(client, app):
    """Retrieved candidates at weight 0: ``relevance_score`` is the retriever's inner product, best first, over
    the items the user has not seen (given candidates: test_fusion)."""
    state = app.state.service
    art = state.artifacts
    scoring = ScoringSpec(weight=0.0)
    artifacts = dataclasses.replace(art, llm=dataclasses.replace(art.llm, scoring=scoring))
    pipeline = RerankPipeline(artifacts, app.state.settings, state.preferences, state.llm, app.state.metrics)
    answer = run_async(client, lambda: pipeline.rerank(RerankRequest(user_id="u17", top_n=10), "w0-retrieved"))
    assert answer.degraded == [] and answer.scored_by == "retriever"
    history = art.users["u17"]
    _, pref = art.preference_of("u17")
    query = art.retriever.user_vectors([history[-art.retriever.cfg.max_len :]], pref[None])[0]  # (H,)
    vectors = art.retriever.item_vectors()  # (N+1, H)
    unseen = [i for i in range(1, len(art.catalog) + 1) if i not in set(history)]
    expected = sorted(((float(vectors[i] @ query), art.catalog[i].item_id) for i in unseen), reverse=True)[:10]
    assert [r.item_id for r in answer.results] == [item for _, item in expected]
    assert [r.relevance_score for r in answer.results] == pytest.approx([s for s, _ in expected], abs=1e-4)


def test_the_service_benchmark_replays_the_prompts_the_service_scored(client, app, tiny_run_dir: Path, tiny_llm_dir):
    """``benchmarks.service_bench.PromptBuilder`` rebuilds an answer's prompts with the service's builder: the
    same prompt tokens as the service reported, for a run user and for a miss (the stand-in, cut)."""
    from benchmarks.service_bench import PromptBuilder, Sample

    builder = PromptBuilder(tiny_run_dir, app.state.settings, app.state.service.artifacts.llm, tiny_llm_dir)
    history = [art.item_id for art in (app.state.service.artifacts.catalog[i] for i in (3, 9, 14, 27, 33, 41, 52))]
    generations = _generations_ended(app)
    for body in ({"user_id": "u20"}, {"user_id": "bench-miss-1", "history": history}):
        answer = client.post("/rerank", json=body | {"top_n": 10, "explain": True}).json()
        assert not [r for r in answer["degraded"] if r.startswith("llm_")] and answer["prompt_tokens"]
        sample = Sample(
            user_id=body["user_id"],
            status=200,
            latency_ms=0.0,
            started_s=0.0,
            degraded=answer["degraded"],
            prompt_tokens=answer["prompt_tokens"],
            source=answer["preference_source"],
            preference=answer["preference"],
            results=answer["results"],
            history=body.get("history"),
        )
        job = builder.job(sample)
        assert job is not None and job.prompt_tokens == answer["prompt_tokens"]
        assert job.label_ids == [i for _, i in app.state.service.llm.labels]
    assert sample.source == "history"  # the miss was answered with the stand-in, which the prompt cuts
    builder.cut = None  # as the benchmark rebuilt it before: the whole stand-in, more tokens than were scored
    uncut = builder.job(sample)
    assert uncut is not None and uncut.prompt_tokens > answer["prompt_tokens"]
    _settle_generations(app, generations)  # the miss's background generation ends here, not in a later test


GENERATIONS = "dpo4rec_preference_generations_total"
ENDS = ("ok", "error", "timeout", "dropped")


def _generations_ended(app) -> float:
    return sum(metric(app, GENERATIONS, outcome=end) for end in ENDS)


def _settle_generations(app, before: float, timeout_s: float = 120.0) -> None:
    """Wait (bounded) until the background generation a miss started has ended, whatever its outcome."""
    deadline = time.monotonic() + timeout_s
    while _generations_ended(app) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
