from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import (
    PARTS,
    Split,
    holdout_validation,
    read_split,
    split_log,
    write_split,
)
from emerg_stream.errors import ConfigError, DataError

# N=9, K=2 (3K=6). Timestamps per item, in the order the rows appear in the file.
ITEM_TIMES = {
    "A": [50, 40, 30, 20, 10, 60, 70, 80, 90, 5],  # 10 rows = N+1 -> old
    "B": [9, 8, 7, 6, 5, 4, 3, 2, 1],  # 9 rows = N -> new, 3 test rows
    "C": [1, 2, 3, 4, 5, 6],  # 6 rows = 3K -> new, no test rows
    "D": [1, 2, 3, 4, 5],  # 5 rows = 3K-1 -> dropped
    "E": [3, 1, 3, 1, 2, 3, 1],  # ties: file order decides among equal times
}


def hand_made_rows(seed: int = 7) -> list[tuple[str, str, int, int]]:
    rows = [
        (item, f"u{i}", ts, i % 2)
        for item, times in ITEM_TIMES.items()
        for i, ts in enumerate(times)
    ]
    # Interleave items, but keep each item's rows in their listed order (file order).
    rng = random.Random(seed)
    queues = {item: [r for r in rows if r[0] == item] for item in ITEM_TIMES}
    out = []
    while any(queues.values()):
        item = rng.choice([i for i, q in queues.items() if q])
        out.append(queues[item].pop(0))
    return out


def seqs(table: pa.Table, item: str) -> list[int]:
    mask = pc.equal(table.column("item"), item)
    return table.filter(mask).column("seq").to_pylist()


def test_split_part_sizes_and_boundaries(make_log) -> None:
    split = split_log(make_log(hand_made_rows(), n=9, k=2))

    assert split.row_counts() == {"old": 10, "warm_a": 6, "warm_b": 6, "warm_c": 6, "test": 4}
    assert split.item_counts() == {"old": 1, "warm_a": 3, "warm_b": 3, "warm_c": 3, "test": 2}
    assert (split.dropped_items, split.dropped_rows) == (1, 5)
    assert set(split.old.column("item").to_pylist()) == {"A"}  # exactly N+1 rows: old
    for part in ("warm_a", "warm_b", "warm_c"):
        assert sorted(set(split.part(part).column("item").to_pylist())) == ["B", "C", "E"]
    assert sorted(set(split.test.column("item").to_pylist())) == ["B", "E"]  # C has exactly 3K


def test_split_orders_each_item_by_time_with_ties_in_file_order(make_log) -> None:
    rows = hand_made_rows()
    split = split_log(make_log(rows, n=9, k=2))
    for item in ("B", "C", "E"):
        in_file = [(ts, seq) for seq, (it, _, ts, _) in enumerate(rows) if it == item]
        expected = [seq for _, seq in sorted(in_file)]  # sort by time, then file position
        got = [
            s
            for part in ("warm_a", "warm_b", "warm_c", "test")
            for s in seqs(split.part(part), item)
        ]
        assert got == expected
        assert seqs(split.warm_a, item) == expected[:2]
        assert seqs(split.warm_b, item) == expected[2:4]
        assert seqs(split.warm_c, item) == expected[4:6]


def test_split_uses_log_defaults_and_overrides(make_log) -> None:
    log = make_log(hand_made_rows(), n=9, k=2)
    assert split_log(log).row_counts() == split_log(log, n=9, k=2).row_counts()
    # N=10: A (10 rows) is no longer old but new with 4 test rows.
    wide = split_log(log, n=10, k=2)
    assert wide.old.num_rows == 0
    assert wide.test.num_rows == 4 + 4


@pytest.mark.parametrize(("n", "k"), [(5, 2), (9, 0), (0, 1)])
def test_split_rejects_impossible_n_k(make_log, n: int, k: int) -> None:
    with pytest.raises(ConfigError, match="n"):
        split_log(make_log(hand_made_rows()), n=n, k=k)


def test_split_rejects_null_timestamps(make_log) -> None:
    log = make_log(hand_made_rows())
    ts = log.table.column("ts").to_pylist()
    ts[3] = None
    table = log.table.set_column(2, "ts", pa.array(ts, pa.int64()))
    bad = InteractionLog(log.name, table, log.schema, log.n, log.k)
    with pytest.raises(DataError, match="'ts' holds nulls"):
        split_log(bad)


def holdout_log(make_log) -> InteractionLog:
    rows = []
    for i in range(20):  # 20 old items with 12 rows each (> N=9)
        rows += [(f"old{i:02d}", f"u{j}", 100 - j, j % 2) for j in range(12)]
    for i in range(2):  # 2 new items with 7 rows
        rows += [(f"new{i}", f"u{j}", j, 1) for j in range(7)]
    random.Random(3).shuffle(rows)
    return make_log(rows, n=9, k=2)


def item_set(table: pa.Table) -> set[str]:
    return set(table.column("item").to_pylist())


def test_holdout_is_deterministic_disjoint_and_ignores_new_items(make_log) -> None:
    split = split_log(holdout_log(make_log))
    val = holdout_validation(split, frac=0.2, seed=0)
    again = holdout_validation(split, frac=0.2, seed=0)

    held = item_set(val.warm_a)
    assert len(held) == 4  # 20% of 20 old items
    assert held == item_set(again.warm_a) and val.old.equals(again.old)
    assert held.isdisjoint(item_set(val.old))
    assert held | item_set(val.old) == item_set(split.old)
    for part in PARTS:
        assert not any(i.startswith("new") for i in item_set(val.part(part)))
    for item in held:
        assert [len(seqs(val.part(p), item)) for p in ("warm_a", "warm_b", "warm_c", "test")] == [
            2,
            2,
            2,
            6,
        ]
    assert sum(val.row_counts().values()) == split.old.num_rows
    # Chunks follow time: warm_a holds each held item's earliest rows.
    for item in held:
        first = pc.min(
            val.warm_b.filter(pc.equal(val.warm_b.column("item"), item)).column("ts")
        ).as_py()
        last_a = pc.max(
            val.warm_a.filter(pc.equal(val.warm_a.column("item"), item)).column("ts")
        ).as_py()
        assert last_a <= first
    others = {frozenset(item_set(holdout_validation(split, 0.2, s).warm_a)) for s in range(1, 6)}
    assert others != {frozenset(held)}


def test_holdout_draw_does_not_depend_on_row_order(make_log) -> None:
    split = split_log(holdout_log(make_log))
    shuffled = Split(
        **{**split.__dict__, "old": split.old.take(pa.array(list(range(split.old.num_rows))[::-1]))}
    )
    assert item_set(holdout_validation(split).warm_a) == item_set(
        holdout_validation(shuffled).warm_a
    )


def test_holdout_rejects_bad_fraction(make_log) -> None:
    split = split_log(holdout_log(make_log))
    with pytest.raises(ConfigError, match="frac"):
        holdout_validation(split, frac=1.0)


def test_write_and_read_split_round_trip(make_log, tmp_path) -> None:
    log = make_log(hand_made_rows(), n=9, k=2, name="tiny-ds")
    log.sources = {"x/input.dat": "ab" * 32}
    split = split_log(log)
    manifest = write_split(split, tmp_path / "out")

    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["row_counts"] == split.row_counts()
    assert manifest["item_counts"] == split.item_counts()
    assert (manifest["n"], manifest["k"], manifest["name"]) == (9, 2, "tiny-ds")
    assert (manifest["dropped_items"], manifest["dropped_rows"]) == (1, 5)
    assert manifest["sources"] == {"x/input.dat": "ab" * 32}
    for part in PARTS:
        data = (tmp_path / "out" / f"{part}.parquet").read_bytes()
        assert manifest["files"][f"{part}.parquet"] == hashlib.sha256(data).hexdigest()

    back = read_split(tmp_path / "out")
    for part in PARTS:
        assert back.part(part).equals(split.part(part))
    assert (back.n, back.k, back.name, back.schema) == (split.n, split.k, split.name, split.schema)
    assert (back.dropped_items, back.dropped_rows, back.sources) == (1, 5, split.sources)


def test_read_split_detects_a_changed_part(make_log, tmp_path) -> None:
    split = split_log(make_log(hand_made_rows()))
    write_split(split, tmp_path)
    write_split(split_log(make_log(hand_made_rows(seed=1))), tmp_path / "other")
    (tmp_path / "test.parquet").write_bytes((tmp_path / "other" / "old.parquet").read_bytes())
    with pytest.raises(DataError, match=r"test\.parquet: sha256"):
        read_split(tmp_path)


def test_read_split_without_manifest(tmp_path) -> None:
    with pytest.raises(DataError, match="missing split manifest"):
        read_split(tmp_path)


def test_split_job_writes_parts_and_prints_counts(tmp_path, capsys) -> None:
    import argparse

    import pyarrow.parquet as pq
    import yaml

    from emerg_stream.jobs import split as split_job

    rows = hand_made_rows()
    pq.write_table(
        pa.table(
            {
                "item": [r[0] for r in rows],
                "user": [r[1] for r in rows],
                "ts": [r[2] for r in rows],
                "label": [r[3] for r in rows],
            }
        ),
        tmp_path / "log.parquet",
    )
    config = {
        "path": "log.parquet",
        "item_id": "item",
        "user_id": "user",
        "label": "label",
        "timestamp": "ts",
        "split": {"n": 9, "k": 2},
    }
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    split_job.add_arguments(parser)
    args = parser.parse_args(
        ["--dataset", str(tmp_path / "ds.yaml"), "--out", str(tmp_path / "out")]
    )

    assert split_job.run(args) == 0
    out = capsys.readouterr().out
    assert "test" in out and "dropped 1 items (5 rows)" in out
    assert read_split(tmp_path / "out").row_counts()["warm_a"] == 6


def test_holdout_caps_test_rows_per_pseudo_new_item(make_log) -> None:
    rows = [("a", f"u{j}", j, j % 2) for j in range(30)] + [("b", f"u{j}", j, 1) for j in range(30)]
    log = make_log(rows, n=9, k=2)
    split = split_log(log)
    capped = holdout_validation(split, frac=0.5, seed=0, max_test_rows=3)
    assert capped.warm_a.num_rows == 2 and capped.warm_c.num_rows == 2
    assert capped.test.num_rows == 3
    # the kept test rows are the earliest ones after the warm-up rows
    assert sorted(capped.test.column("ts").to_pylist()) == [6, 7, 8]


def test_holdout_fewest_rows_holds_out_the_least_rated_old_items(make_log) -> None:
    # old items o0..o9 with 12..21 rows (N=9): the 3 least-rated are o0, o1, o2
    rows = [(f"o{i}", f"u{j}", j, j % 2) for i in range(10) for j in range(12 + i)]
    split = split_log(make_log(rows, n=9, k=2))
    val = holdout_validation(split, frac=0.3, seed=0, pick="fewest_rows")
    assert item_set(val.warm_a) == {"o0", "o1", "o2"}
    assert item_set(holdout_validation(split, frac=0.3, seed=5, pick="fewest_rows").warm_a) == {
        "o0",
        "o1",
        "o2",
    }
    # random picks differ from the fewest-rows ones for some seed
    drawn = {frozenset(item_set(holdout_validation(split, 0.3, s).warm_a)) for s in range(6)}
    assert drawn != {frozenset({"o0", "o1", "o2"})}


def test_holdout_fewest_rows_breaks_ties_by_seed(make_log) -> None:
    rows = [(f"o{i}", f"u{j}", j, j % 2) for i in range(10) for j in range(12)]
    split = split_log(make_log(rows, n=9, k=2))
    picks = {
        frozenset(item_set(holdout_validation(split, 0.3, s, pick="fewest_rows").warm_a))
        for s in range(6)
    }
    assert len(picks) > 1 and all(len(p) == 3 for p in picks)
    with pytest.raises(ConfigError, match="pick"):
        holdout_validation(split, pick="most_rows")  # type: ignore[arg-type]
