"""State store pieces: phases, dedupe window, ItemState codec (current and version 1),
compact item form, lazy item maps and partition stores."""

import gc
import hashlib
import io
import json
import tracemalloc
from collections import deque

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emerg_stream.errors import SchemaError
from emerg_stream.io.avro import AvroSerde, frame
from emerg_stream.io.records import ItemState
from emerg_stream.io.schemas import load_manifest, load_schema
from emerg_stream.state import ItemMap, RecentIds, StateStore, SupportRows
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.state.dedupe import CONFLICT, DUPLICATE, NEW, content_digest, event_hash
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


def v1_value(task: ItemTask, ids: list[str], codec: ItemStateCodec) -> bytes:
    """The task as emerg-stream wrote it before version 2: ItemState v1, its schema id."""
    schema = json.loads(json.dumps(load_schema("ItemState", 1)).replace("timestamp-millis", "x"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf,
        fastavro.parse_schema(schema, named_schemas={}),
        {
            "item_id": task.item_id,
            "categorical": task.categorical,
            "multi": task.multi,
            "numeric": task.numeric,
            "version": task.version,
            "phase": task.phase,
            "support_size": task.support_size,
            "next_threshold": task.next_threshold,
            "support": codec.decode_rows(task.support),
            "recent_event_ids": ids,
            "adjacency": task.adjacency.tolist() if task.adjacency is not None else [],
            "id_embedding": task.id_embedding.tolist() if task.id_embedding is not None else [],
            "n_fields": task.n_fields,
            "last_offsets": [
                {"topic": t, "partition": p, "offset": o}
                for (t, p), o in sorted(task.last_offsets.items())
            ],
            "updated_time": task.updated_time,
        },
    )
    v1_id = load_manifest().records["ItemState"].versions[1].schema_id
    return frame(v1_id, buf.getvalue())


def assert_same_task(a: ItemTask, b: ItemTask) -> None:
    for name in ("item_id", "categorical", "multi", "numeric", "phase", "version"):
        assert getattr(a, name) == getattr(b, name), name
    assert (a.support_size, a.next_threshold) == (b.support_size, b.next_threshold)
    assert a.support == b.support and a.recent == b.recent
    assert a.last_offsets == b.last_offsets and a.updated_time == b.updated_time
    assert a.phi_bytes == b.phi_bytes and a.n_fields == b.n_fields


# -- de-duplication window -------------------------------------------------------------


def test_recent_ids_detect_duplicates_within_the_window_only():
    r = RecentIds(3)
    assert r.add("a") and r.add("b") and r.add("c")
    assert not r.add("b")
    assert r.add("d")  # evicts "a"
    assert "a" not in r and "b" in r and "d" in r
    assert r.add("a")  # forgotten, so accepted again
    assert len(r) == 3
    assert list(r.hashes()) == [event_hash(i) for i in ("c", "d", "a")]  # oldest first
    with pytest.raises(ValueError):
        RecentIds(0)


def test_recent_ids_tell_a_conflicting_event_from_a_duplicate_through_a_round_trip():
    """Same id + same content: duplicate; same id + other content: conflict (the first
    stays); the digests survive the ring's wrap-around and a changelog round trip; a
    window restored without digests (an older state) answers duplicate for both."""
    a = {"item_id": "i", "user_id": "u1", "label": 1, "categorical": {}, "multi": {}}
    a = {**a, "numeric": {"age": 30.0}, "event_time": 5}
    b = dict(a, label=0)
    two = dict(a, categorical={"x": "1", "y": "2"})
    assert content_digest(two) == content_digest(dict(a, categorical={"y": "2", "x": "1"}))
    assert content_digest(two) != content_digest(a) != content_digest(dict(a, event_time=6))
    r = RecentIds(3)
    assert r.check("e0", content_digest(a)) == NEW
    for j in range(1, 5):  # wraps the ring of 3: e0 and e1 are forgotten
        assert r.check(f"e{j}", content_digest(dict(a, event_time=j))) == NEW
    assert r.check("e4", content_digest(dict(a, event_time=4))) == DUPLICATE
    assert r.check("e4", content_digest(dict(b, event_time=4))) == CONFLICT
    assert r.check("e0", content_digest(b)) == NEW  # forgotten: new again
    again = RecentIds.from_bytes(3, r.to_bytes(), r.content_bytes())
    assert again == r
    assert again.check("e0", content_digest(a)) == CONFLICT
    assert again.check("e0", content_digest(b)) == DUPLICATE
    blind = RecentIds.from_bytes(3, r.to_bytes())
    assert blind.check("e0", content_digest(a)) == DUPLICATE


def test_event_hash_is_the_documented_blake2b_digest():
    """The hash is part of the changelog format: pinned to its definition."""
    for event_id in ("ml-100k:1", "é-✓", ""):
        digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
        assert event_hash(event_id) == int.from_bytes(digest, "little")
    r = RecentIds(4, ["x", "y"])
    assert r.to_bytes() == b"".join(
        hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ("x", "y")
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgh", max_size=2), max_size=120), st.integers(1, 12))
def test_recent_ids_answer_like_a_window_of_strings(ids, window):
    """Same answers as the reference (the ids in a deque, oldest evicted), through ring
    growth and wrap-around, and the same window after a round trip through bytes."""
    r = RecentIds(window)
    ref: deque[str] = deque()
    for i in ids:
        fresh = i not in ref
        assert r.add(i) == fresh
        if fresh:
            ref.append(i)
            if len(ref) > window:
                ref.popleft()
        assert len(r) == len(ref) <= window
        assert list(r.hashes()) == [event_hash(x) for x in ref]
    back = RecentIds.from_bytes(window, r.to_bytes())
    assert back == r
    for i in "abcdefgh":
        assert (i in back) == (i in ref)
    cut = RecentIds.from_bytes(2, r.to_bytes())
    assert list(cut.hashes()) == [event_hash(x) for x in list(ref)[-2:]]


def test_recent_ids_refuse_a_partial_hash():
    with pytest.raises(ValueError, match="8-byte"):
        RecentIds.from_bytes(4, b"\x00" * 12)


# -- item states ------------------------------------------------------------------------


def test_item_state_round_trip_is_exact_and_matches_the_generic_encoder():
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec)
    value = codec.encode(task)
    # the spliced fast path writes exactly what the generic Avro encoder writes
    generic = codec.serde.decode(value)
    assert codec.serde.encode(generic) == value
    assert generic["support"] == codec.decode_rows(task.support)
    assert generic["recent_event_hashes"] == task.recent.to_bytes()
    back = codec.decode(value)
    assert_same_task(back, task)
    assert codec.decode_rows(back.support)[0]["numeric"] == {"age": 31.5}
    assert [r["event_id"] for r in codec.decode_rows(back.support)] == ["e1", "e2"]
    assert "e0" in back.recent and "e3" not in back.recent
    assert back.adjacency is not None and back.adjacency.dtype == np.float32
    np.testing.assert_array_equal(back.adjacency, task.adjacency)
    np.testing.assert_array_equal(back.id_embedding, task.id_embedding)
    assert back.n_fields == 9
    assert codec.encode(back) == value


def test_item_state_without_params_and_support_round_trips():
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec, params=False)
    task.support = SupportRows()
    task.phase = "old"
    value = codec.encode(task)
    assert codec.serde.encode(codec.serde.decode(value)) == value
    back = codec.decode(value)
    assert back.adjacency is None and back.is_old and len(back.support) == 0
    assert codec.decode_rows(back.support) == []
    bare = ItemTask("bare")  # no side features, no params, no rows, no ids
    value = codec.encode(bare)
    assert codec.serde.encode(codec.serde.decode(value)) == value
    assert codec.decode(value).side_features() == ({}, {}, {})


def test_side_features_are_kept_encoded_and_read_back_as_given():
    task = ItemTask("i", categorical={"year": "1996"}, multi={"genres": ["Drama", "War"]})
    assert task.side_features() == ({"year": "1996"}, {"genres": ["Drama", "War"]}, {})
    task.categorical["year"] = "2001"  # a decoded copy: the state does not change
    assert task.categorical == {"year": "1996"} and isinstance(task.side_bytes, bytes)


def test_a_version_1_value_restores_with_its_ids_hashed_and_rows_kept():
    """A changelog written before the hashes (ItemState v1, ids as strings) still
    restores: same item, same rows, its ids remembered (a replayed click is a duplicate),
    and it is written back in the current version."""
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec)
    old = v1_value(task, ["e0", "e1", "e2"], codec)
    assert not codec.is_current(old)
    assert codec.key_matches(b"i1", old) and not codec.key_matches(b"i2", old)
    back = codec.decode(old, "i1")
    assert_same_task(back, task)
    assert not back.recent.add("e2") and back.recent.add("e9")
    assert codec.decode_rows(back.support) == codec.decode_rows(task.support)
    assert codec.is_current(codec.encode(back))
    # a v1 window longer than this worker's is cut to the newest ids
    small = ItemStateCodec(dedupe_window=2).decode(old)
    assert list(small.recent.hashes()) == [event_hash("e1"), event_hash("e2")]


def test_the_shadow_methods_phi_round_trips_beside_the_primarys():
    """ItemState v4 carries the shadow's φ (with its checkpoint's version); the fast
    path writes what the generic encoder writes, and the primary's φ is untouched."""
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec)
    plain = codec.decode(codec.encode(task))
    task.set_shadow_params([], np.full(8, 0.25, dtype=np.float32), "shadow-v1")
    value = codec.encode(task)
    assert codec.serde.encode(codec.serde.decode(value)) == value
    back = codec.decode(value)
    assert_same_task(back, task)
    assert back.phi_bytes == plain.phi_bytes
    assert back.has_shadow and back.shadow_model_version == "shadow-v1"
    assert back.shadow_adjacency is not None and back.shadow_adjacency.size == 0
    np.testing.assert_array_equal(back.shadow_id_embedding, np.full(8, 0.25))
    back.clear_shadow()
    assert not codec.decode(codec.encode(back)).has_shadow


def test_a_version_3_value_restores_without_shadow_params():
    codec = ItemStateCodec(dedupe_window=5)
    task = make_task(codec)
    generic = dict(codec.serde.decode(codec.encode(task)))
    for name in ("shadow_adjacency", "shadow_id_embedding", "shadow_model_version"):
        del generic[name]
    schema = json.loads(json.dumps(load_schema("ItemState", 3)).replace("timestamp-millis", "x"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema, named_schemas={}), generic)
    v3_id = load_manifest().records["ItemState"].versions[3].schema_id
    old = frame(v3_id, buf.getvalue())
    assert not codec.is_current(old)
    back = codec.decode(old, "i1")
    assert_same_task(back, task)
    assert not back.has_shadow and back.shadow_model_version == ""


def test_restored_window_is_cut_to_the_configured_size():
    codec = ItemStateCodec(dedupe_window=5)
    value = codec.encode(make_task(codec))
    small = ItemStateCodec(dedupe_window=2).decode(value)
    assert list(small.recent.hashes()) == [event_hash("e1"), event_hash("e2")]


def test_corrupt_item_state_raises_schema_error():
    codec = ItemStateCodec(dedupe_window=5)
    value = codec.encode(make_task(codec))
    with pytest.raises(SchemaError):
        codec.decode(value[:40])  # cut in the front fields
    # cut in the support rows: their bytes are checked when they are decoded (an update)
    with pytest.raises(SchemaError):
        codec.decode_rows(codec.decode(value[:-7]).support)
    with pytest.raises(SchemaError, match="holds item"):
        codec.decode(value, "i2")
    rec = codec.serde.decode(value)
    with pytest.raises(SchemaError, match="adjacency"):
        codec.decode(codec.serde.encode({**rec, "adjacency": [0.0] * 10}))  # not F*F
    with pytest.raises(SchemaError, match="8-byte"):
        codec.decode(codec.serde.encode({**rec, "recent_event_hashes": b"\x01" * 7}))
    with pytest.raises(SchemaError):
        codec.decode(AvroSerde(ItemState).encode(rec)[:5] + b"\x00\x00")


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, 10_000), flip=st.integers(1, 255), drop=st.integers(0, 40))
def test_a_damaged_value_decodes_or_raises_schema_error(cut, flip, drop):
    """Never another exception: a corrupt changelog value stops with a clear error."""
    codec = ItemStateCodec(dedupe_window=5)
    data = bytearray(codec.encode(make_task(codec)))
    pos = 5 + cut % (len(data) - 5)
    data[pos] ^= flip
    damaged = bytes(data[: len(data) - drop])
    try:
        task = codec.decode(damaged)
        codec.decode_rows(task.support)
    except SchemaError:
        pass


def test_state_bytes_per_item_stay_small():
    """K=20 support rows with four user features, F=9, D=16, 64 recent ids (8-byte hashes
    and 4-byte content digests): ~2.8 KiB."""
    codec = ItemStateCodec(dedupe_window=64)
    row = {
        **ROW,
        "categorical": {"gender": "F", "age": "25", "occupation": "12", "zip": "55455"},
        "multi": {},
        "numeric": {},
    }
    task = make_task(codec)
    task.support = SupportRows(
        codec.encode_row({**row, "event_id": f"ml-1m:{900000 + i}"}) for i in range(20)
    )
    task.recent = RecentIds(64, [f"ml-1m:{900000 + i}" for i in range(64)])
    task.set_params(np.zeros(81), np.zeros(16))
    assert len(codec.encode(task)) <= 2900


def test_decoded_items_hold_under_4_kib_each():
    """The worker's fullest item between updates (K-1 = 9 rows, 49 ids in the window,
    F=9, D=16, side features), decoded from the changelog as a restore does: its Python
    allocations per item (tracemalloc, 300 items) stay under the 4 KiB target."""
    codec = ItemStateCodec(dedupe_window=1000)
    users = {"gender": "F", "age": "25", "occupation": "12", "zip": "55455"}
    values = []
    for i in range(300):
        task = ItemTask(
            item_id=f"item-{i:07d}",
            categorical={"year": "1996"},
            multi={"title_words": ["english", "patient", "the"], "genres": ["Drama", "War"]},
            phase="common",
            version=5,
            support_size=49,
            next_threshold=50,
            support=[
                codec.encode_row({**ROW, "event_id": f"ml-100k:{i * 50 + j}", "categorical": users})
                for j in range(9)
            ],
            recent=RecentIds(1000, [f"ml-100k:{i * 50 + j}" for j in range(49)]),
            adjacency=np.ones(81),
            id_embedding=np.ones(16),
            last_offsets={("emerg.items", 1): i, ("emerg.interactions", 1): 50 * i},
        )
        values.append((task.item_id, codec.encode(task)))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = ItemMap({item_id: codec.decode(v, item_id) for item_id, v in values})
    gc.collect()
    per_item = (tracemalloc.get_traced_memory()[0] - before) / len(held)
    tracemalloc.stop()
    print(f"decoded item: {per_item:,.0f} B")
    assert per_item <= 4096, per_item


# -- lazy item maps and the store ------------------------------------------------------


class CountingLoader:
    def __init__(self, codec: ItemStateCodec) -> None:
        self.codec = codec
        self.loaded: list[str] = []

    def __call__(self, item_id: str, value: bytes) -> ItemTask:
        self.loaded.append(item_id)
        return self.codec.load(item_id, value)


def raw_items(codec: ItemStateCodec, ids: list[str]) -> dict[str, bytes]:
    out = {}
    for i in ids:
        task = make_task(codec)
        task.item_id = i
        out[i] = codec.encode(task)
    return out


def test_item_map_decodes_an_item_only_when_it_is_looked_up():
    codec = ItemStateCodec(dedupe_window=5)
    load = CountingLoader(codec)
    checked: list[str] = []
    items = ItemMap({"live": ItemTask("live")}, raw=raw_items(codec, ["a", "b", "c"]), load=load)
    items.add_check(lambda t: checked.append(t.item_id))
    assert len(items) == 4 and "a" in items and "zz" not in items and items.n_raw == 3
    assert load.loaded == []  # membership and length do not decode
    a = items["a"]
    assert a.item_id == "a" and a.version == 3 and items["a"] is a
    assert items.get("b") is not None and items.get("zz") is None
    assert load.loaded == ["a", "b"] and checked == ["a", "b"] and items.n_raw == 1
    items["c"] = ItemTask("c")  # a new state replaces the raw one
    assert items.n_raw == 0 and items["c"].version == 0 and load.loaded == ["a", "b"]
    del items["live"]
    assert sorted(items) == ["a", "b", "c"]
    with pytest.raises(KeyError):
        items["zz"]


def test_item_map_iteration_decodes_everything_and_a_failed_check_leaves_it_raw():
    codec = ItemStateCodec(dedupe_window=5)
    items = ItemMap(raw=raw_items(codec, ["a", "b"]), load=codec.load)

    def refuse_b(task: ItemTask) -> None:
        if task.item_id == "b":
            raise RuntimeError("refused")

    items.add_check(refuse_b)
    with pytest.raises(RuntimeError):
        items["b"]
    assert items.n_raw == 2 and "b" in items
    items = ItemMap(raw=raw_items(codec, ["a", "b"]), load=codec.load)
    assert sorted(t.item_id for t in items.values()) == ["a", "b"] and items.n_raw == 0
    with pytest.raises(ValueError):
        ItemMap(raw={"a": b""})  # no loader


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


def test_item_task_keeps_phi_as_float32_views():
    task = ItemTask("i", adjacency=np.arange(4.0).reshape(2, 2), id_embedding=[0.5, 1.5, 2.5])
    assert task.n_fields == 2
    assert task.adjacency is not None and task.adjacency.tolist() == [0, 1, 2, 3]
    assert task.id_embedding is not None and task.id_embedding.tolist() == [0.5, 1.5, 2.5]
    assert task.adjacency.dtype == np.float32 and not task.adjacency.flags.writeable
    with pytest.raises(ValueError, match="F x F"):
        task.set_params(np.zeros(5), np.zeros(3))
    with pytest.raises(ValueError, match="together"):
        ItemTask("j", adjacency=np.zeros(4))
