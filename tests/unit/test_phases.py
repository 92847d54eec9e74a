"""The warm-up schedule and the phase list have one owner (:mod:`emerg_stream.phases`).

* The schedule's arithmetic: K, 2K, 3K, then every K.
* The stream and the offline protocol agree for every support count: the worker's
  processor (real model handler, in-memory records) publishes, for an item with ``n``
  rows, exactly the updates the schedule names; the public split cuts the same item's
  rows into the protocol's phases by the same schedule.
* A source scan: no module other than the owner writes a phase name or the K arithmetic
  out by hand (the copies this test replaced lived in seven files).
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import worker_world as ww

from emerg_stream.config import TopicSettings
from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import PARTS, split_log
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent, ItemParams
from emerg_stream.phases import (
    COLD,
    COMMON,
    PHASES,
    STREAM_PHASES,
    WARM_PHASES,
    WarmupSchedule,
)
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.processor import WarmupProcessor

ROOT = Path(__file__).resolve().parents[2]
K = 2
#: Every support count from 1 to 6K (one new item each; an item is announced with its first click).
COUNTS = tuple(range(1, 6 * K + 1))


def test_schedule_thresholds_follow_the_protocol() -> None:
    s = WarmupSchedule(20)
    assert [s.phase_at(t * 20) for t in range(1, 7)] == [*WARM_PHASES, COMMON, COMMON, COMMON]
    assert s.first_threshold == 20 and s.next_threshold(40) == 60
    assert s.protocol_rows == 60 and s.max_support_rows == 20
    assert [s.phase_after(n) for n in (0, 19, 20, 59, 60, 79, 80)] == [
        COLD,
        COLD,
        "warm_a",
        "warm_b",
        "warm_c",
        "warm_c",
        COMMON,
    ]
    assert s.updates(45) == [(20, "warm_a"), (40, "warm_b")]
    rank = np.arange(70, dtype=np.int64)
    assert np.bincount(s.protocol_part(rank)).tolist() == [20, 20, 20, 10]
    with pytest.raises(ValueError, match="multiple"):
        s.phase_at(30)
    with pytest.raises(ValueError, match="multiple"):
        s.next_threshold(0)
    with pytest.raises(ValueError, match="positive"):
        WarmupSchedule(0)


def test_phase_lists_are_one_list() -> None:
    assert (COLD, *WARM_PHASES) == PHASES
    assert (*PHASES, COMMON) == STREAM_PHASES
    assert PARTS[1:-1] == WARM_PHASES


@pytest.fixture(scope="module")
def world() -> ww.World:
    return ww.make_world(n_new=len(COUNTS), n_old=1, k=K, rows=COUNTS)


def test_stream_and_offline_protocol_agree_for_every_count(world, tmp_path) -> None:
    schedule = WarmupSchedule(K)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        handler = TorchWarmupHandler.from_checkpoint(
            ww.build_checkpoint(world, tmp_path / "ck"), "cpu"
        )
        topics = TopicSettings()
        proc = WarmupProcessor(
            handler,
            topics,
            dedupe_window=100,
            pending_max=1000,
            pending_max_age_ms=10**9,
            clock=lambda: 1_800_000_000.0,
        )
        proc.assign(0, {}, None)
        items, inter = AvroSerde(ItemEvent), AvroSerde(Interaction)
        msgs: list[Inbound] = [
            Inbound(topics.items, 0, i, r["item_id"].encode(), items.encode(r))
            for i, r in enumerate(world.items)
        ]
        msgs += [
            Inbound(topics.interactions, 0, i, r["item_id"].encode(), inter.encode(r))
            for i, r in enumerate(world.interactions)
        ]
        out, _ = proc.process(msgs)
    finally:
        torch.set_num_threads(threads)
    serde = AvroSerde(ItemParams)
    published: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for o in out:
        if o.topic == topics.item_params:
            rec = serde.decode(o.value)
            published[rec["item_id"]].append((rec["support_size"], rec["phase"]))
    log = InteractionLog("tiny", world.table, ww.SCHEMA, 10 * K, K, {})
    split = split_log(log)
    per_part = {p: split.part(p).column("item").to_pylist() for p in PARTS}
    checked = set()
    for item_id in world.new_ids:
        n = len(world.rows_of(item_id))
        want = [(0, COLD), *schedule.updates(n)]
        assert published[item_id] == want, (item_id, n)
        # the offline split: new iff the stream reaches warm_c; K rows per warm phase
        rows = {p: per_part[p].count(item_id) for p in PARTS}
        if n >= schedule.protocol_rows:
            assert [rows[p] for p in WARM_PHASES] == [K] * len(WARM_PHASES), item_id
            assert rows["test"] == n - schedule.protocol_rows
            assert [p for _, p in want][: len(PHASES)] == list(PHASES)
        else:
            assert sum(rows.values()) == 0, item_id
        checked.add(n)
    assert checked == set(COUNTS)


# -- no second copy ------------------------------------------------------------------

OWNER = ROOT / "emerg_stream" / "phases.py"
NAMES = {COLD, COMMON, *WARM_PHASES}


def hand_written(path: Path) -> list[str]:
    """Phase names as string literals, and K arithmetic (``3 * k``, ``n // k``, ...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in NAMES:
            found.append(f"{path}:{node.lineno} {node.value!r}")
        if isinstance(node, ast.BinOp) and isinstance(
            node.op, ast.FloorDiv | ast.Mod | ast.Mult | ast.Add
        ):
            for side in (node.left, node.right):
                if (isinstance(side, ast.Name) and side.id == "k") or (
                    isinstance(side, ast.Attribute) and side.attr == "k"
                ):
                    found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_but_the_owner_writes_phases_or_the_schedule_by_hand() -> None:
    files = [
        p
        for folder in ("emerg_stream", "jobs")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != OWNER
    ]
    found = [hit for p in files for hit in hand_written(p)]
    assert not found, "use emerg_stream.phases (names, WarmupSchedule):\n" + "\n".join(found)


def test_the_scan_sees_a_copy(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        'PHASES = ("cold", "warm_a")\ndef f(rank, split):\n    return rank // split.k, 3 * k\n'
    )
    assert len(hand_written(probe)) == 4
    assert OWNER.is_file() and hand_written(OWNER)  # the owner itself is the only one


def test_the_schemas_name_every_phase_a_record_can_carry() -> None:
    # the wire contract documents the phase strings; a new phase must appear there too
    for name in ("ItemParams", "ItemState", "Prediction"):
        schema = json.loads((ROOT / "schemas" / f"{name}.avsc").read_text(encoding="utf-8"))
        (field,) = [f for f in schema["fields"] if f["name"] == "phase"]
        named = set(re.findall(r"\b[a-z_]+\b", field["doc"]))
        assert set(STREAM_PHASES) <= named, (name, field["doc"])
