"""Prometheus metrics of one app (its own ``CollectorRegistry``, so two apps in a process never clash).

Names follow the Prometheus conventions (``_total`` counters, ``_seconds`` histograms, base units).
What SPEC section 7 asks for: request counts and latency per endpoint and per pipeline stage, cache
hits/misses, preference generations, degraded answers by reason, in-flight requests, and the engine's
queue (requests vLLM has not finished) next to the LLM calls this service has open; and the engines' health
(restarts, state, generations given up; ``service.supervisor``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Request latencies on CPU range from ~1 ms (cache + retriever) to seconds (LLM stages).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """All metrics of one app; the pipeline and middleware update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dpo4rec_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "dpo4rec_http_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "dpo4rec_stage_duration_seconds", "pipeline stage latency", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("dpo4rec_in_flight_requests", "rerank requests being served", registry=r)
        self.rejected = Counter(
            "dpo4rec_rejected_requests", "requests refused before the pipeline", ["reason"], registry=r
        )
        self.cache = Counter(
            "dpo4rec_preference_cache_lookups", "preference cache lookups by result", ["result"], registry=r
        )  # hit | miss | error
        self.preference_source = Counter(
            "dpo4rec_preference_source", "where a request's preference came from", ["source"], registry=r
        )  # cache | run | generated | none
        self.generations = Counter(
            "dpo4rec_preference_generations", "LLM preference generations by outcome", ["outcome"], registry=r
        )  # ok | timeout | error | dropped
        self.answers = Counter(
            "dpo4rec_answers", "answers by request slice and by what ordered them", ["slice", "scorer"], registry=r
        )
        self.reloads = Counter(
            "dpo4rec_reloads", "run versions offered to the service: swapped in or refused", ["outcome"], registry=r
        )
        self.served_version = Info("dpo4rec_served", "the run version the service answers with", registry=r)
        self.degraded = Counter(
            "dpo4rec_degraded_responses", "answers with a degraded part, by reason", ["reason"], registry=r
        )
        self.llm_in_flight = Gauge(
            "dpo4rec_llm_requests_in_flight", "LLM calls this service has open", ["job"], registry=r
        )
        self.preference_queue = Gauge(
            "dpo4rec_preference_queue", "background preference generations pending or running", registry=r
        )  # bounded by DPO4REC_PREFERENCE_QUEUE; beyond it a generation is dropped (outcome "dropped")
        self.llm_calls = Counter(
            "dpo4rec_llm_calls", "engine requests this service made, by job", ["job"], registry=r
        )  # a re-rank scores one prompt per candidate order
        self.rerank_prompt_tokens = Histogram(
            "dpo4rec_rerank_prompt_tokens",
            "prompt tokens of a scored re-rank (all candidate orders)",
            buckets=(64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096),
            registry=r,
        )
        self.retriever_batch_size = Histogram(
            "dpo4rec_retriever_batch_size",
            "requests served by one retriever forward pass (concurrent requests coalesced)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.engine_pending_tokens = Gauge(
            "dpo4rec_engine_pending_tokens", "prompt tokens of admitted LLM work not finished", registry=r
        )
        self.engine_token_rate = Gauge(
            "dpo4rec_engine_token_rate", "measured engine rate, prompt tokens per busy second", registry=r
        )
        self.engine_counters = {  # cumulative, read off the engine (llm.engine.EngineCounters)
            name: Gauge(f"dpo4rec_engine_{name}", help_, registry=r)
            for name, help_ in (
                ("prompt_tokens", "prompt tokens the engine has taken in"),
                ("generation_tokens", "tokens the engine has generated"),
                ("prefix_queries", "prompt tokens looked up in the prefix cache"),
                ("prefix_hits", "prompt tokens found in the prefix cache (not computed again)"),
            )
        }
        self.engine_unfinished = Gauge(
            "dpo4rec_engine_unfinished_requests", "requests queued or running in the vLLM engine", registry=r
        )
        # the engines' health (service.supervisor): restarts after a death, each job's engine state (1 for the
        # current one), and background generations given up: queue_full, engine_dead (it died under the
        # generation again after one retry), engine_failed (its restarts gave up)
        self.engine_restarts = Counter(
            "dpo4rec_engine_restarts", "engine restarts after its process died, by job it serves", ["job"], registry=r
        )
        self.engine_state = Gauge(
            "dpo4rec_engine_state",
            "1 for the state the job's engine is in (alive, restarting, failed)",
            ["job", "state"],
            registry=r,
        )
        self.generations_dropped = Counter(
            "dpo4rec_preference_generations_dropped",
            "background preference generations given up, by reason",
            ["reason"],
            registry=r,
        )
        for job in ("preference", "rerank"):
            self.llm_in_flight.labels(job=job)
            self.llm_calls.labels(job=job)
            self.engine_restarts.labels(job=job)
        for result in ("hit", "miss", "error"):
            self.cache.labels(result=result)
        for reason in ("queue_full", "engine_dead", "engine_failed"):
            self.generations_dropped.labels(reason=reason)

    def watch_admission(self, pending: Callable[[], float], rate: Callable[[], float]) -> None:
        """Admission's view of the engine at scrape time: admitted tokens not finished, measured rate."""
        self.engine_pending_tokens.set_function(pending)
        self.engine_token_rate.set_function(rate)

    def watch_engine(self, unfinished: Callable[[], float], counters: Sequence[Any] = ()) -> None:
        """Read the engines' queue length and their counters (``llm.engine.EngineCounters``, summed over the
        engines) at scrape time."""
        self.engine_unfinished.set_function(unfinished)
        for name, gauge in self.engine_counters.items():
            gauge.set_function(functools.partial(_counter, tuple(counters), name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (0 if absent); for tests and the readiness report."""
        got = self.registry.get_sample_value(name, labels or {})
        return float(got) if got is not None else 0.0


def _counter(counters: tuple[Any, ...], name: str) -> float:
    return float(sum(getattr(c, name) for c in counters))
