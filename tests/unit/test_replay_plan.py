"""Replay planning on a tiny hand-made log: order, held-out rows, announcements, ids."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pyarrow as pa
import pytest

from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import split_log
from emerg_stream.errors import ConfigError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent
from emerg_stream.stream.replay import event_id, plan_replay, replay_records

# (item, user, ts, label). n=9, k=2: "old" has 10 rows (old item), "bb" 8 rows (new:
# 2+2+2 warm rows, 2 test rows), "dd" 6 rows (new, no test row), "cc" 3 rows (dropped).
# Timestamps tie across and within items and are out of file order on purpose.
ROWS = [
    ("bb", "u1", 50, 1),  # 0  bb rank 4 (ts 50, before row 9)  -> warm_c
    ("old", "u1", 10, 0),  # 1
    ("bb", "u2", 10, 0),  # 2  bb rank 0 -> warm_a
    ("cc", "u3", 10, 1),  # 3
    ("old", "u2", 10, 1),  # 4
    ("bb", "u3", 10, 1),  # 5  bb rank 1 (tie with row 2, later in file) -> warm_a
    ("dd", "u4", 20, 0),  # 6
    ("old", "u3", 20, 0),  # 7
    ("bb", "u4", 30, 0),  # 8  bb rank 2 -> warm_b
    ("bb", "u5", 50, 1),  # 9  bb rank 5 (tie with row 0, later in file) -> warm_c
    ("bb", "u6", 40, 1),  # 10 bb rank 3 -> warm_b
    ("old", "u4", 30, 1),  # 11
    ("bb", "u7", 90, 0),  # 12 bb rank 7 -> test
    ("bb", "u8", 60, 1),  # 13 bb rank 6 -> test
    ("dd", "u5", 20, 1),  # 14
    ("cc", "u6", 25, 0),  # 15
    ("old", "u5", 40, 0),  # 16
    ("dd", "u6", 21, 0),  # 17
    ("old", "u6", 50, 1),  # 18
    ("dd", "u7", 22, 1),  # 19
    ("old", "u7", 60, 0),  # 20
    ("dd", "u8", 23, 0),  # 21
    ("old", "u8", 70, 1),  # 22
    ("cc", "u9", 26, 1),  # 23
    ("dd", "u9", 24, 1),  # 24
    ("old", "u9", 80, 0),  # 25
    ("old", "u0", 5, 1),  # 26
]


@pytest.fixture
def tiny(make_log: Callable[..., InteractionLog]) -> InteractionLog:
    return make_log(ROWS, n=9, k=2, name="tiny")


def sent(tiny: InteractionLog, **kw: object) -> list[tuple[str, str, dict[str, object]]]:
    plan = plan_replay(tiny)
    return [(kind, key, dict(rec)) for kind, key, rec in replay_records(plan, **kw)]  # type: ignore[arg-type]


def rows_of(records: list[tuple[str, str, dict[str, object]]]) -> list[int]:
    return [int(str(r["event_id"]).split(":")[1]) for k, _, r in records if k == "interaction"]


def test_global_event_time_order_ties_in_file_order(tiny: InteractionLog) -> None:
    order = rows_of(sent(tiny))
    ts = [ROWS[i][2] for i in order]
    assert ts == sorted(ts)
    for a, b in itertools.pairwise(order):
        if ROWS[a][2] == ROWS[b][2]:
            assert a < b, "ties must keep file order"
    assert order[0] == 26  # the earliest row, although it is the last line of the file


def test_test_rows_left_out_and_everything_else_sent(tiny: InteractionLog) -> None:
    plan = plan_replay(tiny)
    assert plan.n_test == 2
    order = rows_of(sent(tiny))
    assert sorted(order) == sorted(set(range(len(ROWS))) - {12, 13})
    assert plan.n_interactions == len(ROWS) - 2


def test_each_new_items_phase_chunks_are_the_offline_split_rows(tiny: InteractionLog) -> None:
    split = split_log(tiny)
    order = rows_of(sent(tiny))
    for item in ("bb", "dd"):
        stream_rows = [i for i in order if ROWS[i][0] == item]
        k = split.k
        for c, part in enumerate(("warm_a", "warm_b", "warm_c")):
            table = split.part(part)
            offline = [
                s
                for s, it in zip(
                    table.column("seq").to_pylist(), table.column("item").to_pylist(), strict=True
                )
                if it == item
            ]
            assert stream_rows[c * k : (c + 1) * k] == offline, (item, part)
    assert [i for i in order if ROWS[i][0] == "bb"][:6] == [2, 5, 8, 10, 0, 9]


def test_every_item_announced_once_before_its_first_interaction(tiny: InteractionLog) -> None:
    records = sent(tiny)
    announced: dict[str, int] = {}
    for pos, (kind, key, rec) in enumerate(records):
        if kind == "item":
            assert key not in announced, f"{key} announced twice"
            announced[key] = pos
            nxt = records[pos + 1]
            assert nxt[0] == "interaction" and nxt[1] == key
            assert rec["event_time"] == nxt[2]["event_time"]
        else:
            assert key in announced, f"interaction of {key} before its announcement"
            assert rec["item_id"] == key
    assert set(announced) == {"old", "bb", "cc", "dd"}


def test_event_ids_are_deterministic_and_name_the_log_row(tiny: InteractionLog) -> None:
    first = [r["event_id"] for k, _, r in sent(tiny) if k == "interaction"]
    again = [r["event_id"] for k, _, r in sent(tiny) if k == "interaction"]
    assert first == again
    assert len(set(first)) == len(first)
    assert first[0] == event_id("tiny", 26) == "tiny:26"


def test_records_carry_side_features_and_encode_as_avro(tiny: InteractionLog) -> None:
    records = sent(tiny)
    kind, key, item = records[0]
    assert kind == "item" and key == "old"
    assert item["categorical"] == {"cat": "o"}
    assert item["multi"] == {"tags": ["to", "common"]}
    assert item["numeric"] == {"price": 26.0}
    assert item["event_time"] == 5000  # seconds -> milliseconds
    kind, _, inter = records[1]
    assert inter == {
        "event_id": "tiny:26",
        "item_id": "old",
        "user_id": "u0",
        "categorical": {"city": "0"},
        "multi": {},
        "numeric": {},
        "label": 1,
        "event_time": 5000,
    }
    items, inters = AvroSerde(ItemEvent), AvroSerde(Interaction)
    for kind, _, rec in records:
        serde = items if kind == "item" else inters
        assert serde.decode(serde.encode(rec)) == rec  # type: ignore[arg-type]


def test_null_features_are_left_out(make_log: Callable[..., InteractionLog]) -> None:
    log = make_log(ROWS, n=9, k=2)
    table = log.table
    cat = table.column("cat").to_pylist()
    cat[26] = None
    price = table.column("price").to_pylist()
    price[26] = float("nan")
    table = table.set_column(table.column_names.index("cat"), "cat", pa.array(cat, pa.string()))
    table = table.set_column(table.column_names.index("price"), "price", pa.array(price))
    log = InteractionLog(log.name, table, log.schema, log.n, log.k)
    _, _, item = next(iter(replay_records(plan_replay(log))))
    assert item["categorical"] == {}
    assert item["numeric"] == {}


def test_limit_and_time_unit(tiny: InteractionLog) -> None:
    records = sent(tiny, limit=3, time_unit="ms")
    assert [k for k, _, _ in records].count("interaction") == 3
    assert records[0][2]["event_time"] == 5
    with pytest.raises(ConfigError, match="time unit"):
        sent(tiny, time_unit="minutes")


def test_plan_matches_split_parts(tiny: InteractionLog) -> None:
    plan = plan_replay(tiny)
    part = {i: plan.part[i] for i in range(len(ROWS))}
    assert [part[i] for i in (2, 5, 8, 10, 0, 9, 13, 12)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert {part[i] for i, r in enumerate(ROWS) if r[0] == "old"} == {0}
    assert {part[i] for i, r in enumerate(ROWS) if r[0] == "cc"} == {-1}
    assert plan.n_items == 4
