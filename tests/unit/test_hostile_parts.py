"""Issue 14's bounds without a broker: sizes, dead-letter truncation, clocks, conflicts.

The integration tests (tests/integration/test_hostile.py) run the same cases through the
broker; here each bound is checked at its edge on the processor, with the real model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import worker_world as ww
import yaml
from test_worker_processor import DEAD, INTER, ITEM, PARAMS, TOPICS, Log, new_processor

from emerg_stream.config import InputSettings
from emerg_stream.errors import ConfigError
from emerg_stream.io.schemas import load_manifest
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state import RecentIds, SupportRows
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.state.item import ItemTask
from emerg_stream.stream import dlq
from emerg_stream.stream.checkpointing import SuspectNote
from emerg_stream.stream.dlq import DeadLetters
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.limits import OutputLimits, check_state_fits, state_bound
from emerg_stream.stream.metrics import OUTCOMES, WorkerMetrics

NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def world() -> ww.World:
    return ww.make_world()


@pytest.fixture(scope="module")
def handler(world, tmp_path_factory) -> Iterator[TorchWarmupHandler]:
    checkpoint = ww.build_checkpoint(world, tmp_path_factory.mktemp("ck") / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(checkpoint, "cpu")
    torch.set_num_threads(threads)


def dead(out):
    return [DEAD.decode(o.value) for o in out if o.topic == TOPICS.dead_letter]


def conserved(proc, n_items: int, n_inter: int) -> None:
    totals = proc.totals()
    assert totals.total("items") == n_items
    assert totals.total("interactions") + len(proc.pending) == n_inter


# -- dead letters ------------------------------------------------------------------------


@pytest.mark.parametrize(("key_len", "value_len"), [(8, 10), (8, 999_918), (400_000, 700_000)])
def test_a_dead_letter_always_fits_and_describes_the_whole_original(key_len, value_len):
    limit = 1_000_000 - 512
    key, value = b"k" * key_len, bytes(range(256)) * (value_len // 256) + b"v" * (value_len % 256)
    msg = Inbound("t", 1, 7, key, value)
    out = DeadLetters("dead", limit).record(msg, "oversize", "x" * 5000, NOW_MS)
    assert len(out.value or b"") + len(out.key or b"") <= limit
    d = DEAD.decode(out.value or b"")
    assert d["truncated"] is (2 * key_len + value_len > limit - 6000)
    assert (d["value_size"], d["key_size"]) == (value_len, key_len)
    assert d["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert d["value"] is not None and value.startswith(d["value"])
    assert d["key"] is not None and key.startswith(d["key"]) and out.key == d["key"]
    assert len(d["message"]) == 2000
    if not d["truncated"]:
        assert (d["key"], d["value"]) == (key, value)


# -- sizes ---------------------------------------------------------------------------------


def test_oversize_records_and_fields_are_dead_lettered_before_use(world, handler):
    inputs = InputSettings(max_value_bytes=4_096, max_string_bytes=64, max_support_row_bytes=512)
    proc = new_processor(handler, inputs=inputs)
    item = next(r for r in world.items if r["item_id"] in world.new_ids)
    rows = world.rows_of(item["item_id"])
    log = Log()
    log.item(item)
    cases = {
        "oversize": dict(rows[0], event_id="big", categorical={"city": "c" * 5_000}),
        "long id": dict(rows[0], event_id="e" * 65),
        "long token": dict(rows[0], event_id="tok", categorical={"city": "é" * 33}),
        "long name": dict(rows[0], event_id="name", numeric={"n" * 65: 1.0}),
        "big row": dict(rows[0], event_id="row", multi={"x": ["t" * 60] * 10}),
        "fits": dict(rows[0], event_id="ok", categorical={"city": "é" * 32}),
    }
    for rec in cases.values():
        log.interaction(rec)
    big_item = dict(item, item_id="big-item", multi={"tags": ["t" * 60] * 80})
    log.item(big_item)
    out, _ = proc.process(log.msgs)
    by_value = {d["value"]: d["error_kind"] for d in dead(out)}
    want = ["oversize", "oversize_field", "oversize_field", "oversize_field", "oversize_field"]
    assert [by_value[INTER.encode(r)] for r in cases.values() if r["event_id"] != "ok"] == want
    assert by_value[ITEM.encode(big_item)] == "oversize"
    totals = proc.totals()
    assert totals.interactions["applied"] == 1  # only "fits" (a 64-byte token: at the bound)
    assert totals.interactions["dead_lettered"] == 5
    conserved(proc, 2, 6)


def test_an_item_state_over_the_changelog_limit_drops_its_oldest_rows_counted(world, handler):
    proc = new_processor(handler)
    proc.use_limits(OutputLimits(changelog=3_000, dead_letter=100_000))
    item = next(r for r in world.items if r["item_id"] in world.new_ids)
    rows = world.rows_of(item["item_id"])[: world.k - 1]
    log = Log()
    log.item(item)
    for j, r in enumerate(rows):
        log.interaction(dict(r, categorical={"city": f"{j}" + "c" * 900}))
    proc.process(log.msgs)
    cp = proc.checkpoint()
    (state,) = [r for r in cp.records if r.key == item["item_id"].encode()]
    assert len(state.value or b"") + len(state.key or b"") <= 3_000
    task = proc.codec.decode(state.value or b"")
    assert proc.rows_dropped == len(rows) - task.support.count > 0
    assert task.support_size == len(rows)  # the applied count is kept
    kept = proc.codec.decode_rows(task.support)
    assert [r["event_id"] for r in kept] == [r["event_id"] for r in rows[-len(kept) :]]


def test_the_start_check_refuses_bounds_whose_largest_state_cannot_fit():
    inputs = InputSettings()
    limits = OutputLimits(changelog=1_000_000 - 512, dead_letter=1_000_000 - 512)
    bound = check_state_fits(inputs, limits, k=20, dedupe_window=1_000, n_fields=9, dim=16)
    assert bound < limits.changelog
    # the bound is an upper bound of a real state at the edge of every setting
    task = ItemTask(
        "i" * inputs.max_string_bytes,
        categorical={"f": "v" * (inputs.max_value_bytes - 100)},
        support=SupportRows([b"r" * inputs.max_support_row_bytes] * 20),
        recent=RecentIds(1_000, [f"e{j}" for j in range(1_000)]),
        adjacency=np.zeros(81),
        id_embedding=np.zeros(16),
        last_offsets={("t" * inputs.max_string_bytes, 0): 2**62},
    )
    value = ItemStateCodec(dedupe_window=1_000).encode(task)
    assert len(value) + len(task.item_id) <= bound
    with pytest.raises(ConfigError, match="MAX_SUPPORT_ROW_BYTES"):
        check_state_fits(inputs, limits, k=60, dedupe_window=1_000, n_fields=9, dim=16)
    small = OutputLimits(changelog=100_000, dead_letter=100_000, sources={"changelog": "x=1"})
    with pytest.raises(ConfigError, match=r"at most 100,000 bytes \(x=1\)"):
        check_state_fits(inputs, small, k=1, dedupe_window=10, n_fields=2, dim=2)
    assert state_bound(inputs, k=1, dedupe_window=10, n_fields=2, dim=2) > 100_000


# -- clocks --------------------------------------------------------------------------------


def test_event_times_beyond_the_skew_bounds_move_no_clock(world, handler):
    inputs = InputSettings(max_ahead_of_wall_ms=60_000, max_ahead_of_clock_ms=3_600_000)
    proc = new_processor(handler, inputs=inputs)
    item = next(r for r in world.items if r["item_id"] in world.new_ids)
    t = item["event_time"]
    log = Log()
    p = 0
    log.add(TOPICS.items, "first", ITEM.encode(dict(item, item_id="first")), p)
    log.add(TOPICS.items, "micro", ITEM.encode(dict(item, item_id="micro", event_time=t * 1000)), p)
    jump = dict(item, item_id="jump", event_time=t + 3_600_001)
    log.add(TOPICS.items, "jump", ITEM.encode(jump), p)
    ok = dict(item, item_id="ok", event_time=t + 3_600_000)
    log.add(TOPICS.items, "ok", ITEM.encode(ok), p)
    future = dict(world.rows_of(item["item_id"])[0], item_id="ok", event_id="future")
    future["event_time"] = NOW_MS + 60_001
    log.add(TOPICS.interactions, "ok", INTER.encode(future), p)
    out, _ = proc.process(log.msgs)
    got = sorted((d["key"], d["error_kind"]) for d in dead(out))
    assert got == [
        (b"jump", "bad_event_time"),
        (b"micro", "bad_event_time"),
        (b"ok", "bad_event_time"),
    ]
    assert proc.progress[p].items_time == t + 3_600_000
    conserved(proc, 4, 1)


# -- conflicts -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep_first", "replace_cold"])
def test_a_reannounced_item_with_other_features_is_a_conflict(world, handler, policy):
    proc = new_processor(handler, inputs=InputSettings(item_conflict=policy))
    item = next(r for r in world.items if r["item_id"] in world.new_ids)
    other = dict(item, categorical={"genre": "comedy" if item["categorical"] else "x"})
    assert other != item
    log = Log()
    log.item(item)
    out1, _ = proc.process(log.msgs)
    log.msgs.clear()
    log.item(dict(item))  # the same again: a duplicate
    log.item(other)
    out2, _ = proc.process(log.msgs)
    totals = proc.totals().items
    assert {k: totals[k] for k in ("applied", "duplicate", "conflicting_item")} == {
        "applied": 1,
        "duplicate": 1,
        "conflicting_item": 1,
    }
    (d,) = dead(out2)
    assert d["error_kind"] == "conflicting_item" and policy in d["message"]
    params = [PARAMS.decode(o.value) for o in out1 + out2 if o.topic == TOPICS.item_params]
    task = proc.store.get(log.msgs[0].partition, item["item_id"])
    assert task is not None
    if policy == "keep_first":
        assert [p["version"] for p in params] == [1]
        assert task.categorical == item["categorical"]
    else:  # no click yet: new features, re-generated cold-start params as version 2
        assert [(p["version"], p["phase"]) for p in params] == [(1, "cold"), (2, "cold")]
        assert task.categorical == other["categorical"]
        assert params[0]["adjacency"] != params[1]["adjacency"]


def test_every_outcome_is_known_to_the_counters():
    assert "conflicting_item" in OUTCOMES and "conflicting_event" in OUTCOMES


def test_a_suspect_note_round_trips_and_merges():
    a = SuspectNote(2, {"items": frozenset({5, 6})}, "RuntimeError: boom")
    b = SuspectNote(2, {"interactions": frozenset({9}), "items": frozenset({1})}, "older")
    m = a.merged(b)
    assert m.offsets == {"items": frozenset({1, 5, 6}), "interactions": frozenset({9})}
    assert m.error == "RuntimeError: boom"
    assert SuspectNote.decode(m.encode()) == m


# -- docs and infra that derive from the code ------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_error_kinds_reference_is_generated_from_the_code():
    """docs/ERROR_KINDS.md equals `emerg-stream dlq kinds`; every kind the package uses is
    in the table, and every kind in the table is used somewhere in the package."""
    doc = (REPO / "docs" / "ERROR_KINDS.md").read_text(encoding="utf-8")
    if doc != dlq.kinds_markdown():
        pytest.fail(
            "docs/ERROR_KINDS.md is out of date: run `emerg-stream dlq kinds > docs/ERROR_KINDS.md`"
        )
    constants = {
        name: getattr(dlq, name) for name in dlq.__all__ if name.isupper() and name != "ERROR_KINDS"
    }
    constants.pop("KINDS")
    assert set(constants.values()) == set(dlq.KINDS)
    source = "\n".join(
        p.read_text() for p in (REPO / "emerg_stream").rglob("*.py") if p.name != "dlq.py"
    )
    for name in constants:
        assert re.search(rf"\bdlq\.{name}\b", source), f"dlq.{name} is documented but never used"
    assert all(v.strip() for v in dlq.KINDS.values())


def test_the_lag_alert_fires_on_behind_only():
    rules = yaml.safe_load((REPO / "infra" / "prometheus-alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert any("emerg_worker_consumer_lag" in e for e in exprs)
    for e in exprs:
        assert "kafka_consumergroup_lag" not in e and "pending_held" not in e, e
    registry = WorkerMetrics().registry
    names = {m.name for m in registry.collect()}
    for e in exprs:
        for metric in re.findall(r"\bemerg_[a-z0-9_]+", e):
            assert metric in names, metric
    prom = yaml.safe_load((REPO / "infra" / "prometheus.yml").read_text())
    assert "/etc/prometheus/prometheus-alerts.yml" in prom["rule_files"]
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus-alerts.yml:/etc/prometheus/prometheus-alerts.yml:ro" in mounts


def _doc_block(doc: str, lang: str) -> str:
    return doc.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_the_client_docs_ids_are_the_manifests():
    doc = (REPO / "docs" / "CLIENTS.md").read_text(encoding="utf-8")
    manifest = load_manifest()
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| `([^`]+)` \|$", doc, re.M)
    assert rows, "the id table is gone"
    got = {name: (int(v), int(i), f) for name, v, i, f in rows}
    want = {}
    for name, entry in manifest.records.items():
        current = entry.versions[entry.current]
        want[name] = (current.version, current.schema_id, f"schemas/{current.file}")
    assert got == want


def test_the_client_example_in_the_docs_round_trips(monkeypatch):
    """The docs' producer snippet frames a value the worker's decoder accepts."""
    doc = (REPO / "docs" / "CLIENTS.md").read_text(encoding="utf-8")
    code = _doc_block(doc, "python")
    monkeypatch.chdir(REPO)
    scope: dict[str, object] = {}
    exec(compile(code, "CLIENTS.md", "exec"), scope)  # the docs' own example
    from emerg_stream.stream.decode import RecordDecoder

    decoder = RecordDecoder([], items_topic="i", interactions_topic="c")
    rec = decoder.item(Inbound("i", 0, 0, b"movie-42", scope["value"]))  # type: ignore[arg-type]
    assert isinstance(rec, dict) and rec["item_id"] == "movie-42"


def test_the_readme_diagram_names_the_default_topics():
    from emerg_stream.config import TopicSettings

    diagram = _doc_block((REPO / "README.md").read_text(encoding="utf-8"), "mermaid")
    names = set(re.findall(r"\bemerg\.[a-z-]+", diagram))
    assert names == set(TopicSettings().names().values())
