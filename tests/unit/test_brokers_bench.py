"""benchmarks/brokers.py without brokers: the per-combination summary and its report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import brokers  # noqa: E402


def _round(c: float, ratio: float, p99: float) -> dict:
    natural = {
        "mode": "natural",
        "load_1m": 0.5,
        "latency_ms": {
            "all versions": {"n": 10, "p50": p99 / 4, "p99": p99},
            "steady state (triggered >= 2 s in)": {"n": 8, "p50": 10.0, "p99": p99 / 2},
        },
    }
    return {
        "throughput": {
            "events_per_s": {"a": 4 * c, "b": 2 * c, "c": c},
            "ratio": ratio,
            "_load": [0.1, 0.2],
        },
        "latency": {
            "runs": [natural],
            "sustainable_events_per_s": 2 * c,
            "rate_events_per_s": c,
            "_load": [0.2, 0.3],
        },
    }


def test_summary_medians_worst_p99_and_the_cost_of_exactly_once():
    runs = {
        "kafka/at_least_once": [_round(1000, 1.0, 300), _round(800, 0.9, 500)],
        "kafka/exactly_once": [_round(700, 0.8, 900), _round(720, 0.85, 700)],
    }
    s = brokers.summarise(runs)
    alo = s["kafka/at_least_once"]
    assert alo["events_per_s"]["c"] == pytest.approx(900)
    assert alo["ratio_median"] == pytest.approx(0.95)
    assert alo["p99_ms_worst"] == 500 and alo["p99_ms_median"] == pytest.approx(400)
    assert s["exactly_once_cost"] == pytest.approx(1 - 710 / 900)
    md = brokers.markdown(s, 2)
    assert "| kafka/exactly_once |" in md and "**-21.1 %**" in md
    assert "450 / 350" in md  # the steady-state p99 of each exactly_once round
