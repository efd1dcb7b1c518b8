"""Admission by predicted completion: a re-rank that would finish after its deadline is shed at once (no
engine work queued) and answered from the retriever; admitted ones complete. The rate estimate itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.admission import Admission, Late
from tests.service.support import metric


def test_prediction_and_rate_estimate() -> None:
    a = Admission(rate=100.0, alpha=1.0, min_sample_s=0.0)
    assert a.predicted_s(50) == pytest.approx(0.5) and a.admits(50, 0.6) and not a.admits(50, 0.4)
    with a.running(100):
        assert a.pending == 100 and a.predicted_s(100) == pytest.approx(2.0)  # queued behind the pending work
        time.sleep(0.05)
    assert a.pending == 0 and 10 < a.rate < 2100  # 100 tokens in >= 0.05 s of busy time (slower when loaded)
    rate = a.rate
    with pytest.raises(RuntimeError), a.running(10_000):  # cancelled or failed work does not teach the rate
        raise RuntimeError("engine died")
    assert a.pending == 0 and a.rate == rate
    with pytest.raises(ValueError):
        Admission(rate=0)


def test_a_background_generation_is_pending_work_but_does_not_teach_the_rate() -> None:
    # a generation decoding alone completes a few tokens per second of engine time: learnt as the rate, it
    # would shed every re-rank behind it (the fault drill of 2026-12-04: 6 of 1 367 answers LLM-scored)
    a = Admission(rate=500.0, alpha=1.0, min_sample_s=0.0)
    with a.running(340, teaches=False):
        assert a.pending == 340 and a.predicted_s(160) == pytest.approx(1.0)  # re-ranks queue behind it
        time.sleep(0.1)
        with a.running(100):  # a re-rank next to it: its busy time is a sample
            time.sleep(0.02)
        taught = a.rate
        assert taught < 100 / 0.02  # learnt from the re-rank's 100 tokens over >= 0.02 s
        time.sleep(0.1)
    assert a.pending == 0 and a.rate == taught  # the generation's 340 "tokens" in 0.22 s taught nothing


def test_a_deadline_miss_cuts_the_rate_but_never_below_the_floor() -> None:
    a = Admission(rate=100.0, backoff=0.5, floor=0.3)
    a.seed(400.0)  # measured on the idle engine at start
    assert a.rate == 400.0 and a.admits(300, 1.0)
    a.missed()
    assert a.rate == 200.0 and not a.admits(300, 1.0)  # late work: the estimate was optimistic
    for _ in range(10):
        a.missed()
    assert a.rate == pytest.approx(120.0)  # 0.3 x the seed: a rate cut to nothing would never be admitted again
    assert a.admits(100, 1.0)


def test_a_burst_checked_at_once_is_admitted_only_as_far_as_it_fits() -> None:
    # requests whose checks come before any of them reaches the engine (a coalesced retrieval releases them
    # together) each see the tokens admitted before them
    a = Admission(rate=1000.0, queue_s=1.0, headroom=1.0)
    tickets = [a.admit(300, 3.0) for _ in range(5)]
    assert [t is not None for t in tickets] == [True, True, True, False, False]
    assert a.pending == 900
    first, second, third = tickets[:3]
    assert first is not None and second is not None and third is not None
    with first, a.running(300, first):  # its prompt runs and finishes
        assert a.pending == 900  # counted once, not again when it starts
    assert a.pending == 600
    with second:  # admitted, then given up before its prompt started (e.g. the request's deadline)
        pass
    third.release()
    third.release()  # settling twice gives back nothing twice
    assert a.pending == 0


def test_admitted_work_waits_behind_at_most_the_queue_limit_however_long_the_deadline() -> None:
    a = Admission(rate=1000.0, queue_s=1.0)
    with a.running(800):  # 0.8 s of predicted work ahead
        assert a.admits(200, 3.0)  # finishes 1.0 s from now
        assert not a.admits(300, 3.0)  # 1.1 s: inside the deadline, beyond the queue limit
        assert not a.admits(100, 0.5)  # the deadline still binds when it is the shorter
    unbounded = Admission(rate=1000.0)
    with unbounded.running(800):
        assert unbounded.admits(2000, 3.0)  # no limit: up to the deadline


def test_a_request_that_cannot_finish_in_time_is_shed_at_once(client, app, monkeypatch):
    llm, pipeline = app.state.service.llm, app.state.service.pipeline
    assert llm.admission.rate > 0  # measured at start
    calls = metric(app, "dpo4rec_llm_calls_total", job="rerank")
    built = metric(app, "dpo4rec_rerank_prompt_tokens_count")
    least = llm.least_tokens(pipeline.rerank_k, pipeline.scoring)  # the bound, computed (and cached) first
    prompts: list[int] = []
    real = llm.rerank_prompts
    monkeypatch.setattr(llm, "rerank_prompts", lambda *a, **kw: prompts.append(1) or real(*a, **kw))
    rate = llm.admission.rate
    llm.admission.rate = 1.0  # the engine as a saturated one looks: a prompt of ~300 tokens needs minutes
    try:
        start = time.perf_counter()
        body = client.post("/rerank", json={"user_id": "u5", "top_n": 4, "deadline_ms": 20_000}).json()
        elapsed = time.perf_counter() - start
    finally:
        llm.admission.rate = rate
    assert body["degraded"] == ["llm_shed"] and [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    assert elapsed < 10.0  # returned well before its 20 s deadline: nothing waited on the engine
    assert metric(app, "dpo4rec_llm_calls_total", job="rerank") == calls  # no engine work was queued
    assert metric(app, "dpo4rec_rerank_prompt_tokens_count") == built  # and no prompt was scored
    assert prompts == []  # nor built: the lower bound alone was late (the early check)
    # with the measured rate and the same deadline the LLM stage is admitted and completes
    tokens = metric(app, "dpo4rec_rerank_prompt_tokens_count")
    admitted = client.post("/rerank", json={"user_id": "u5", "top_n": 4, "deadline_ms": 20_000}).json()
    assert admitted["degraded"] == [] and metric(app, "dpo4rec_llm_calls_total", job="rerank") == calls + 1
    assert metric(app, "dpo4rec_rerank_prompt_tokens_count") == tokens + 1 and prompts == [1]
    assert 0 < least < admitted["prompt_tokens"]  # a lower bound
    assert metric(app, "dpo4rec_engine_token_rate") > 0


def test_prompts_wait_for_an_engine_slot_in_arrival_order_and_give_up_when_their_turn_is_too_late() -> None:
    """Admitted prompts beyond ``slots`` wait in the service; one whose turn comes too late for its deadline
    raises ``Late`` before it reaches the engine, and the work in the engine is not disturbed."""

    async def scenario() -> tuple[list[str], list[str]]:
        a = Admission(rate=1000.0, slots=1)
        order: list[str] = []
        late: list[str] = []
        release = asyncio.Event()

        async def prompt(name: str, tokens: int, deadline_in_s: float | None) -> None:
            deadline = None if deadline_in_s is None else time.perf_counter() + deadline_in_s
            with a.running(tokens):
                try:
                    async with a.engine_slot(tokens, deadline):
                        order.append(name)
                        assert a.in_engine == tokens  # one slot: it is alone in the engine
                        if name == "first":
                            await release.wait()
                except Late:
                    late.append(name)

        tasks = [asyncio.create_task(prompt("first", 500, None))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(prompt("second", 500, 10.0)))
        tasks.append(asyncio.create_task(prompt("hopeless", 500, 0.05)))  # needs 0.5 s, has 0.05
        tasks.append(asyncio.create_task(prompt("third", 100, 10.0)))
        await asyncio.sleep(0.1)
        assert a.pending == 1600 and a.in_engine == 500  # queued work counts for admission, not for the engine
        release.set()
        await asyncio.gather(*tasks)
        assert a.pending == 0 and a.in_engine == 0
        return order, late

    order, late = asyncio.run(scenario())
    assert order == ["first", "second", "third"] and late == ["hopeless"]


def test_without_slots_every_prompt_goes_to_the_engine_at_once() -> None:
    async def scenario() -> int:
        a = Admission(rate=1.0)  # so slow that any deadline would be missed: no slots, no check
        inside = 0
        async with a.engine_slot(10_000, time.perf_counter() + 0.001):
            async with a.engine_slot(10_000, time.perf_counter() + 0.001):
                inside = 2
        return inside

    assert asyncio.run(scenario()) == 2


def test_background_work_is_counted_ahead_of_re_ranks_only_on_their_engine(smollm2_tokenizer) -> None:
    # a preference engine of its own runs niced below the re-rank engine (service.runtime): its generations
    # are not queued ahead of re-ranks; on the re-rank engine they are, in its steps
    from llm.engine import GenerationConfig
    from llm.prompts import PromptConfig
    from service.language_model import LanguageModel, LLMJobConfig
    from service.telemetry import ServiceMetrics

    cfg = LLMJobConfig(prompt=PromptConfig(), generation=GenerationConfig(), rerank_k=4, loras={})
    rerank_engine, own_engine = object(), object()  # only which job shares which engine matters here
    for preference_engine, counted in ((rerank_engine, 50), (own_engine, 0)):
        engines = {"rerank": rerank_engine, "preference": preference_engine}
        llm = LanguageModel(engines, smollm2_tokenizer, cfg, ServiceMetrics(), Admission(rate=100.0))  # type: ignore[arg-type]
        with llm._accounted("preference", 50, None):
            assert llm.admission.pending == counted
            with llm._accounted("rerank", 30, None):
                assert llm.admission.pending == counted + 30
        assert llm.admission.pending == 0
