"""State store pieces: phases, dedupe window, ItemState codec, partition stores."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emerg_stream.errors import SchemaError
from emerg_stream.state import RecentIds, StateStore, crossed_phase
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.state.item import ItemTask

ROW = {
    "event_id": "e1",
    "item_id": "i1",  # extra key: ignored by the compact row form
    "user_id": "u1",
    "categorical": {"city": "x"},
    "multi": {"langs": ["fr", "de"]},
    "numeric": {"age": 31.5},
    "label": 1,
    "event_time": 1_700_000_000_123,
}


def make_task(codec: ItemStateCodec, *, params: bool = True) -> ItemTask:
    return ItemTask(
        item_id="i1",
        categorical={"genre": "drama"},
        multi={"tags": ["a", "b"]},
        numeric={"price": 3.25},
        phase="warm_b",
        version=3,
        support_size=9,
        next_threshold=12,
        support=[codec.encode_row(ROW), codec.encode_row({**ROW, "event_id": "e2", "label": 0})],
        recent=RecentIds(5, ["e0", "e1", "e2"]),
        adjacency=np.linspace(-1, 1, 81, dtype=np.float32) if params else None,
        id_embedding=np.arange(8, dtype=np.float32) / 7 if params else None,
        last_offsets={("emerg.items", 2): 5, ("emerg.interactions", 2): 77},
        updated_time=1_700_000_000_999,
    )


def test_phase_thresholds_follow_the_protocol():
    k = 20
    assert [crossed_phase(t * k, k) for t in range(1, 7)] == [
        "warm_a",
        "warm_b",
        "warm_c",
        "common",
        "common",
        "common",
    ]
    with pytest.raises(ValueError, match="multiple"):
        crossed_phase(30, k)
    with pytest.raises(ValueError, match="positive"):
        crossed_phase(0, 0)


def test_recent_ids_detect_duplicates_within_the_window_only():
    r = RecentIds(3)
    assert r.add("a") and r.add("b") and r.add("c")
    assert not r.add("b")
    assert r.add("d")  # evicts "a"
    assert "a" not in r and list(r) == ["b", "c", "d"]
    assert r.add("a")  # forgotten, so accepted again
    assert len(r) == 3
    with pytest.raises(ValueError):
        RecentIds(0)


@given(st.lists(st.text(max_size=4), max_size=60), st.integers(1, 10))
def test_recent_ids_never_exceed_their_window(ids, window):
    r = RecentIds(window)
    for i in ids:
        r.add(i)
        assert len(r) <= window
        assert i in r
    assert len(set(r)) == len(r)


def test_item_state_round_trip_is_exact_and_matches_the_generic_encoder():
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec)
    value = codec.encode(task)
    # the spliced fast path writes exactly what the generic Avro encoder writes
    assert codec.serde.encode(codec.serde.decode(value)) == value
    back = codec.decode(value)
    assert back.item_id == task.item_id and back.phase == "warm_b" and back.version == 3
    assert back.support == task.support
    assert codec.decode_row(back.support[0])["numeric"] == {"age": 31.5}
    assert list(back.recent) == ["e0", "e1", "e2"]
    assert back.adjacency is not None and back.adjacency.dtype == np.float32
    np.testing.assert_array_equal(back.adjacency, task.adjacency)
    np.testing.assert_array_equal(back.id_embedding, task.id_embedding)
    assert back.n_fields == 9
    assert back.last_offsets == task.last_offsets
    assert back.updated_time == task.updated_time


def test_item_state_without_params_and_support_round_trips():
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec, params=False)
    task.support = []
    task.phase = "old"
    value = codec.encode(task)
    assert codec.serde.encode(codec.serde.decode(value)) == value
    back = codec.decode(value)
    assert back.adjacency is None and back.is_old and back.support == []


def test_restored_window_is_cut_to_the_configured_size():
    codec = ItemStateCodec(dedupe_window=5)
    value = codec.encode(make_task(codec))
    small = ItemStateCodec(dedupe_window=2).decode(value)
    assert list(small.recent) == ["e1", "e2"]


def test_corrupt_item_state_raises_schema_error():
    codec = ItemStateCodec(dedupe_window=5)
    value = codec.encode(make_task(codec))
    with pytest.raises(SchemaError):
        codec.decode(value[:-7])
    bad = make_task(codec)
    bad.adjacency = np.zeros(10, dtype=np.float32)  # not F*F
    with pytest.raises(SchemaError, match="adjacency"):
        codec.decode(codec.encode(bad))


def test_state_bytes_per_item_stay_small():
    """K=20 support rows with four user features, F=9, D=16, 64 recent ids: ~2.6 KiB."""
    codec = ItemStateCodec(dedupe_window=64)
    row = {
        **ROW,
        "categorical": {"gender": "F", "age": "25", "occupation": "12", "zip": "55455"},
        "multi": {},
        "numeric": {},
    }
    task = make_task(codec)
    task.support = [codec.encode_row({**row, "event_id": f"ml-1m:{900000 + i}"}) for i in range(20)]
    task.recent = RecentIds(64, [f"ml-1m:{900000 + i}" for i in range(64)])
    task.id_embedding = np.zeros(16, dtype=np.float32)
    assert len(codec.encode(task)) <= 4096


def test_store_drops_a_partition_in_one_step():
    store = StateStore()
    store.add_partition(0, {"a": ItemTask("a")})
    part = store.add_partition(1)
    part.items["b"] = ItemTask("b")
    part.touch("b")
    part.touch("gone")
    assert len(store) == 2 and store.get(1, "b") is not None and store.get(2, "b") is None
    assert [t.item_id for t in part.take_dirty()] == ["b"] and not part.dirty
    assert store.drop_partition(1) == 1
    assert store.partitions == [0] and 1 not in store and len(store) == 1
