"""Locust scenarios against a running re-ranking service (SPEC section 9: load tests outside the unit run).

One ``HttpUser`` whose tasks are the four kinds of traffic, picked by weight on every iteration (so even
a handful of users sends all four):

- ``known_user`` (weight 6): a user of the run's ``users.json``, no history: the preference comes from
  the cache (or the run, re-warming the cache), candidates from the retriever;
- ``new_user`` (2): a fresh user id with a random ``history`` of catalog item ids: a cache miss, answered
  with the history stand-in (``preference_pending``) while the LLM writes the preference in the background;
- ``rerank_only`` (2): a known user with given ``candidates`` (Cohere-style re-ranking, no retrieval);
- ``bad_request`` (1): malformed JSON, unknown item ids, an unknown user without history. These must
  get a 4xx: a 4xx counts as a success there, anything else as a failure.

Everywhere else only a 200 with a well-formed body is a success; every 5xx is a failure, and so is a
429 (counted apart: it is the service's overload answer, not an error). Responses with a non-empty
``degraded`` list are counted by reason. At test stop the counts and locust's own per-scenario stats
(percentiles, RPS) go to a JSON file, which ``loadtests/run.py`` reads.

Environment: ``DPO4REC_LOADTEST_*``, read once per locust process by ``LoadTestSettings`` below (its
field descriptions say what each variable does; ``DPO4REC_LOADTEST_RUN`` is required).

Run it with ``python -m loadtests.run`` (which starts the service too), or by hand against a running
service::

    DPO4REC_LOADTEST_RUN=runs/default locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8000

The request cap and the counts are per locust process: use it as a single process (no ``--processes``
or workers).
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import gevent
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.exception import StopUser
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

SCENARIOS = ("known_user", "new_user", "rerank_only", "bad_request")
BAD_KINDS = ("malformed_json", "unknown_candidates", "unknown_history", "unknown_user")
PERCENTILES = (0.5, 0.95, 0.99)


# ---- the environment ----------------------------------------------------------------------------------


class LoadTestSettings(BaseSettings):
    """The load test's environment (``loadtests/run.py`` sets it); an empty variable counts as unset."""

    model_config = SettingsConfigDict(
        env_prefix="DPO4REC_LOADTEST_", env_file=None, env_ignore_empty=True, extra="ignore"
    )

    run: Path | None = Field(
        default=None,
        description="run directory the service serves (users.json, catalog.jsonl); required to send requests",
    )
    counts: Path | None = Field(default=None, description="where to write the JSON at test stop; unset: not written")
    max_requests: int = Field(default=0, description="stop the whole test after this many requests; 0: no cap")
    wait_s: float = Field(
        default=0.1, description="each user's think time between requests is uniform in [0, this] seconds"
    )
    api_key: SecretStr | None = Field(
        default=None, description="sent as `Authorization: Bearer` when the service requires keys; unset: none sent"
    )


settings = LoadTestSettings()


# ---- the run's users and items ------------------------------------------------------------------------


class RunData:
    """Known user ids and catalog item ids of a run directory (read once per locust process)."""

    def __init__(self, run: Path):
        from rundir.reader import read_catalog, read_users

        self.users = sorted(read_users(run))
        self.items = read_catalog(run).item_ids
        if not self.users or len(self.items) < 2:
            raise ValueError(f"{run}: needs users in users.json and at least 2 items in catalog.jsonl")

    def history(self, rng: random.Random) -> list[str]:
        return rng.sample(self.items, rng.randint(min(3, len(self.items)), min(20, len(self.items))))

    def candidates(self, rng: random.Random) -> list[str]:
        return rng.sample(self.items, rng.randint(2, min(30, len(self.items))))


_run_data: RunData | None = None


def run_data() -> RunData:
    global _run_data
    if _run_data is None:
        if settings.run is None:
            raise RuntimeError("set DPO4REC_LOADTEST_RUN to the run directory the service serves")
        _run_data = RunData(settings.run)
    return _run_data


# ---- counts and the request cap -----------------------------------------------------------------------


class Tally:
    """What locust's stats do not keep: status codes, degraded reasons and preference sources."""

    def __init__(self) -> None:
        self.status: dict[str, Counter[str]] = defaultdict(Counter)  # scenario -> status code -> n
        self.bad_status: dict[str, Counter[str]] = defaultdict(Counter)  # bad kind -> status code -> n
        self.degraded: dict[str, Counter[str]] = defaultdict(Counter)  # scenario -> reason -> n
        self.degraded_responses: Counter[str] = Counter()  # scenario -> answers with a non-empty list
        self.sources: Counter[str] = Counter()  # preference_source of the 200 answers
        self.max_requests = settings.max_requests
        self.started = 0  # requests begun (the cap counts these)
        self.stopped_by: str | None = None

    def take(self, environment: Environment) -> bool:
        """Reserve one request under the cap; at the cap, quit the runner (once) and refuse."""
        if self.max_requests and self.started >= self.max_requests:
            if self.stopped_by is None and environment.runner is not None:
                self.stopped_by = "max_requests"
                log.info("request cap of %d reached: stopping the test", self.max_requests)
                gevent.spawn(environment.runner.quit)  # not from inside a user: quit() kills the users
            return False
        self.started += 1
        return True

    def report(self, environment: Environment) -> dict[str, Any]:
        stats = environment.stats
        scenarios = {}
        for name in SCENARIOS:
            entry = stats.entries.get((name, "POST"))
            scenarios[name] = {
                **_entry_summary(entry),
                "status": dict(self.status[name]),
                "status_5xx": _count_5xx(self.status[name]),
                "status_429": self.status[name].get("429", 0),
                "degraded_responses": self.degraded_responses[name],
                "degraded": dict(self.degraded[name]),
            }
        degraded: Counter[str] = Counter()
        for reasons in self.degraded.values():
            degraded.update(reasons)
        return {
            "scenarios": scenarios,
            "total": _entry_summary(stats.total),
            "bad_kinds": {kind: dict(c) for kind, c in self.bad_status.items()},
            "status_5xx": sum(s["status_5xx"] for s in scenarios.values()),
            "status_429": sum(s["status_429"] for s in scenarios.values()),
            "connection_errors": sum(c.get("0", 0) for c in self.status.values()),
            "degraded_responses": sum(self.degraded_responses.values()),
            "degraded": dict(degraded),
            "preference_sources": dict(self.sources),
            "requests_started": self.started,
            "max_requests": self.max_requests or None,
            "stopped_by": self.stopped_by,  # "max_requests", or None: stopped from outside (-t, SIGTERM)
        }


def _count_5xx(status: Counter[str]) -> int:
    return sum(n for code, n in status.items() if code.startswith("5"))


def _entry_summary(entry: Any) -> dict[str, Any]:
    """Requests, failures, RPS and latency percentiles (ms, locust's rounding) of one stats entry."""
    if entry is None or entry.num_requests == 0:
        return {"requests": 0, "failures": 0, "rps": 0.0, "latency_ms": None}
    latency: dict[str, float] = {f"p{round(q * 100)}": entry.get_response_time_percentile(q) for q in PERCENTILES}
    for key, value in (("mean", entry.avg_response_time), ("min", entry.min_response_time)):
        latency[key] = round(value, 1)
    latency["max"] = round(entry.max_response_time, 1)
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.total_rps, 3),
        "latency_ms": latency,
    }


tally = Tally()


def write_counts(environment: Environment) -> None:
    if settings.counts is None:
        return
    out = settings.counts
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(tally.report(environment), indent=1) + "\n")
    tmp.replace(out)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    write_counts(environment)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    write_counts(environment)  # again: a SIGTERM'd run may quit without a test_stop


# ---- the user -----------------------------------------------------------------------------------------


class RerankUser(HttpUser):
    """Sends ``POST /rerank`` of the four kinds, weighted."""

    wait_time = between(0.0, settings.wait_s)

    def on_start(self) -> None:
        self.data = run_data()
        self.rng = random.Random()
        if settings.api_key is not None:
            self.client.headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"

    # ---- scenarios ----

    @task(6)
    def known_user(self) -> None:
        self._rerank("known_user", {"user_id": self.rng.choice(self.data.users)})

    @task(2)
    def new_user(self) -> None:
        user = f"loadtest-new-{uuid.uuid4().hex[:12]}"
        self._rerank("new_user", {"user_id": user, "history": self.data.history(self.rng)})

    @task(2)
    def rerank_only(self) -> None:
        body = {"user_id": self.rng.choice(self.data.users), "candidates": self.data.candidates(self.rng)}
        self._rerank("rerank_only", body | {"top_n": min(5, len(body["candidates"]))})

    @task(1)
    def bad_request(self) -> None:
        kind = self.rng.choice(BAD_KINDS)
        unknown = f"no-such-item-{uuid.uuid4().hex[:8]}"
        if kind == "malformed_json":
            self._bad(kind, data=b'{"user_id": "1", "top_n": ', headers={"Content-Type": "application/json"})
        elif kind == "unknown_candidates":
            candidates = [*self.data.candidates(self.rng), unknown]
            self._bad(kind, json={"user_id": self.rng.choice(self.data.users), "candidates": candidates})
        elif kind == "unknown_history":
            user = f"loadtest-bad-{uuid.uuid4().hex[:12]}"
            self._bad(kind, json={"user_id": user, "history": [*self.data.history(self.rng), unknown]})
        else:
            self._bad(kind, json={"user_id": f"loadtest-unknown-{uuid.uuid4().hex[:12]}"})

    # ---- sending and judging ----

    def _reserve(self) -> None:
        if not tally.take(self.environment):
            raise StopUser()

    def _rerank(self, scenario: str, body: dict[str, Any]) -> None:
        self._reserve()
        with self.client.post("/rerank", json=body, name=scenario, catch_response=True) as r:
            code = r.status_code
            tally.status[scenario][str(code)] += 1
            if code != 200:
                r.failure(_describe(r))
                return
            try:
                answer = r.json()
                results, degraded = answer["results"], answer["degraded"]
                ok = isinstance(results, list) and isinstance(degraded, list)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                r.failure("200 without a rerank response body")
                return
            if degraded:
                tally.degraded_responses[scenario] += 1
                tally.degraded[scenario].update(str(reason) for reason in degraded)
            tally.sources[str(answer.get("preference_source"))] += 1
            r.success()

    def _bad(self, kind: str, **request: Any) -> None:
        self._reserve()
        with self.client.post("/rerank", name="bad_request", catch_response=True, **request) as r:
            code = r.status_code
            tally.status["bad_request"][str(code)] += 1
            tally.bad_status[kind][str(code)] += 1
            if 400 <= code < 500:
                r.success()
            else:
                r.failure(f"{kind}: expected a 4xx, got {_describe(r)}")


def _describe(r: Any) -> str:
    """A short, stable failure message (locust groups failures by message: no request ids in it)."""
    code = r.status_code
    if code == 0:
        return f"connection error: {type(r.error).__name__}"
    if code == 429:
        return "HTTP 429 (overloaded)"
    try:
        kind = r.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        kind = "no error envelope"
    return f"HTTP {code} ({kind})"
