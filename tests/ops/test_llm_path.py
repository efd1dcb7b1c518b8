"""``benchmarks/llm_path.py``'s headline: the service's goodput against the bare engine's rate at the SLO, and the
p99 of all answers checked only up to 1.5x that rate (pure arithmetic on level summaries; the benchmark itself runs
real engines and is not a test)."""

from __future__ import annotations

from typing import Any

from benchmarks.llm_path import headline


def _level(goodput: float, p99: float, meets: bool) -> dict[str, Any]:
    return {"goodput_rps": goodput, "meets_slo": meets, "latency_ms": {"p99": p99}}


def test_headline_compares_with_the_bare_rate_at_the_slo_and_checks_tails_up_to_1_5x() -> None:
    report = {
        "levels": [
            {"rate": 2.0, "service": _level(2.0, 900, True), "bare": _level(2.0, 800, True)},
            {"rate": 4.0, "service": _level(3.7, 2900, False), "bare": _level(4.0, 2500, True)},
            {"rate": 6.0, "service": _level(3.9, 3040, False), "bare": _level(1.0, 3000, False)},
            {"rate": 8.0, "service": _level(3.5, 9000, False), "bare": _level(0.2, 3000, False)},  # past 1.5x
        ],
        "miss_hit_service": {"miss_over_hit_p50": 1.1},
    }
    out = headline(report, "service", 3000)
    assert out["bare_rate_at_slo_rps"] == 4.0
    assert out["goodput_over_bare_rate_at_slo"] == 3.9 / 4.0
    assert [r["rate"] for r in out["p99_all_answers_up_to_1_5x"]] == [2.0, 4.0, 6.0]
    assert out["p99_within_deadline_plus_50ms"]  # 3040 <= 3050; the 9 s tail at 2x capacity is not judged
    assert out["miss_over_hit_p50"] == 1.1
    report["levels"][2]["service"]["latency_ms"]["p99"] = 3051.0
    assert not headline(report, "service", 3000)["p99_within_deadline_plus_50ms"]
