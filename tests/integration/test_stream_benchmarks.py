"""The stream benchmarks run at tiny sizes (keeps them from rotting; no timing asserts).

Each script starts its own embedded broker and prints a markdown table and one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import growth_stream, latency, members, run_all, state, stream_throughput

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("restore_benchmark_globals"),
]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_stream_throughput_tiny(capsys):
    res = stream_throughput.main(["--limit", "300", "--reps", "1", "--partitions", "1"])
    assert last_json(capsys.readouterr().out)["benchmark"] == "stream_throughput"
    assert res["events"] > 300 and all(v > 0 for v in res["events_per_s"].values())
    (line,) = run_all.stream_targets({"stream_throughput": res})
    assert line["met"] in ("yes", "no")


def test_latency_tiny(capsys):
    res = latency.main(["--limit", "600", "--seconds", "1", "--rate", "300", "--partitions", "1"])
    assert last_json(capsys.readouterr().out)["benchmark"] == "latency"
    assert [r["mode"] for r in res["runs"]] == ["natural", "fill"]
    for run in res["runs"]:
        assert run["latency_ms"]["all versions"]["n"] > 0
        assert run["batches"]["n"] > 0
    assert all(res["latency_ms"][m]["p50"] > 0 for m in ("natural", "fill"))
    (line,) = run_all.stream_targets({"latency": res})
    assert "p99" in line["measured"]


def test_state_tiny(capsys):
    res = state.main(["--items", "200", "--reps", "1"])
    assert last_json(capsys.readouterr().out)["benchmark"] == "state"
    assert res["encoded_bytes_per_item"] > 0 and res["restore_items_per_s"] > 0
    assert len(run_all.stream_targets({"state": res})) == 2


def test_members_tiny(capsys):
    res = members.main(["--limit", "300", "--reps", "1", "--partitions", "2"])
    assert last_json(capsys.readouterr().out)["benchmark"] == "members"
    assert all(len(v) == int(k) for k, v in res["records_per_member"].items())
    assert sum(res["records_per_member"]["2"]) == res["events"]
    (line,) = run_all.stream_targets({"members": res})
    assert "x" in line["measured"]


def test_growth_stream_tiny(capsys, tmp_path):
    png = tmp_path / "growth.png"
    res = growth_stream.main(["--sizes", "30", "60", "--clicks", "3", "--png", str(png)])
    assert last_json(capsys.readouterr().out)["benchmark"] == "growth_stream"
    assert [r["stream"]["events"] for r in res["rows"]] == [30 * 4, 60 * 4]
    assert all(r["state"]["restore_items_per_s"] > 0 for r in res["rows"])
    assert png.stat().st_size > 0


def test_brokers_tiny_on_the_embedded_broker(capsys):
    from benchmarks import brokers

    args = ["--combos", "embedded/at_least_once", "--limit", "300", "--reps", "1"]
    res = brokers.main([*args, "--seconds", "2"])
    out = capsys.readouterr().out
    assert last_json(out)["benchmark"] == "brokers" and "| embedded/at_least_once |" in out
    row = res["summary"]["embedded/at_least_once"]
    assert row["events_per_s"]["c"] > 0 and row["p99_ms_median"] > 0
    assert "exactly_once_cost" not in res["summary"]  # no Kafka rows in this run
