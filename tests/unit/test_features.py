from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emerg_stream.data.log import ColumnSpec, LogSchema
from emerg_stream.errors import DataError, ModelError
from emerg_stream.features import (
    OOV,
    FeatureSpec,
    encode,
    encode_records,
    item_side_index,
    to_torch,
)

SCHEMA = LogSchema(
    item_id="item",
    user_id="user",
    label="label",
    timestamp="ts",
    item_features=(
        ColumnSpec("cat", "categorical", "item"),
        ColumnSpec("tags", "multi", "item", max_len=3),
        ColumnSpec("price", "numeric", "item"),
    ),
    user_features=(ColumnSpec("city", "categorical", "user"),),
)

ITEM, CAT, TAGS, PRICE, USER, CITY = range(6)


def train_table() -> pa.Table:
    return pa.table(
        {
            "item": ["i1", "i2", "i2", "i3"],
            "user": ["u1", "u1", "u2", "u3"],
            "label": pa.array([1, 0, 1, 0], pa.int8()),
            "ts": pa.array([10, 20, 30, 40], pa.int64()),
            "cat": ["b", "a", "a", "b"],
            "tags": pa.array([["x", "y"], ["y"], ["y", "z", "w", "v"], []], pa.list_(pa.string())),
            "price": pa.array([1.0, 2.0, 3.0, None]),
            "city": ["c1", "c2", None, "c1"],
        }
    )


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec.fit(SCHEMA, train_table())


def test_field_order_offsets_and_sizes(spec: FeatureSpec) -> None:
    assert [f.name for f in spec.fields] == ["item", "cat", "tags", "price", "user", "city"]
    assert [f.side for f in spec.fields] == ["item"] * 4 + ["user"] * 2
    assert (spec.n_fields, spec.n_item_fields, spec.max_tokens) == (6, 4, 3)
    assert spec.fields[0].offset == 1  # global 0 is padding
    for prev, nxt in zip(spec.fields, spec.fields[1:], strict=False):
        assert nxt.offset == prev.offset + prev.size
    assert spec.total_size == spec.fields[-1].offset + spec.fields[-1].size
    assert spec.fields[PRICE].size == 1
    assert item_side_index(spec) == [CAT, TAGS, PRICE]


def test_vocabularies_by_frequency_then_token(spec: FeatureSpec) -> None:
    assert spec.vocabs["item"] == [OOV, "i2", "i1", "i3"]
    assert spec.vocabs["cat"] == [OOV, "a", "b"]
    # Only the first max_len=3 tokens count: "v" never reaches the vocabulary.
    assert spec.vocabs["tags"] == [OOV, "y", "w", "x", "z"]
    assert spec.vocabs["city"] == [OOV, "c1", "c2"]  # null is not a token
    assert FeatureSpec.fit(SCHEMA, train_table(), min_count=2).vocabs["item"] == [OOV, "i2"]
    mean, std = spec.numeric_stats["price"]
    assert mean == pytest.approx(2.0) and std == pytest.approx(math.sqrt(2 / 3))


def test_categorical_and_unknown_values_map_to_oov(spec: FeatureSpec) -> None:
    rows = pa.table(
        {"item": ["i2", "never-seen", None], "cat": ["b", "zzz", None], "user": ["u1", "u9", "u2"]}
    )
    enc = encode(spec, rows)
    item, cat = spec.fields[ITEM], spec.fields[CAT]
    assert enc.tokens[:, ITEM, 0].tolist() == [item.offset + 1, item.offset, item.offset]
    assert enc.tokens[:, CAT, 0].tolist() == [cat.offset + 2, cat.offset, cat.offset]
    assert enc.weights[:, CAT, :].tolist() == [[1, 0, 0]] * 3
    assert enc.tokens[:, CAT, 1:].sum() == 0


def test_multi_mean_weights_truncation_and_empty(spec: FeatureSpec) -> None:
    tags = pa.array([["x", "y"], ["y", "q", "w", "z"], [], None], pa.list_(pa.string()))
    enc = encode(spec, pa.table({"tags": tags}))
    off = spec.fields[TAGS].offset
    assert enc.tokens[:, TAGS, :].tolist() == [
        [off + 3, off + 1, 0],
        [off + 1, off + 0, off + 2],  # "q" unknown -> OOV; "z" dropped past max_len
        [off, 0, 0],  # empty -> OOV with weight 1
        [off, 0, 0],  # null -> OOV with weight 1
    ]
    np.testing.assert_allclose(
        enc.weights[:, TAGS, :],
        [[0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3], [1, 0, 0], [1, 0, 0]],
        rtol=1e-6,
    )


def test_numeric_normalisation_and_null(spec: FeatureSpec) -> None:
    enc = encode(spec, pa.table({"price": pa.array([2.0, 3.0, None])}))
    mean, std = spec.numeric_stats["price"]
    assert enc.tokens[:, PRICE, 0].tolist() == [spec.fields[PRICE].offset] * 3
    np.testing.assert_allclose(enc.weights[:, PRICE, 0], [0.0, (3.0 - mean) / std, 0.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_numeric_raises_unless_allowed(spec: FeatureSpec, bad: float) -> None:
    rows = pa.table({"price": pa.array([1.0, bad])})
    with pytest.raises(DataError, match="'price'"):
        encode(spec, rows)
    enc = encode(spec, rows, allow_nonfinite=True)
    assert enc.weights[1, PRICE, 0] == 0.0


def test_missing_columns_are_all_null(spec: FeatureSpec) -> None:
    enc = encode(spec, pa.table({"item": ["i1", "i3"]}))
    assert enc.tokens.shape == (2, 6, 3) and enc.tokens.dtype == np.int64
    assert enc.weights.dtype == np.float32
    assert (enc.tokens[:, USER, 0] == spec.fields[USER].offset).all()
    assert (enc.weights[:, USER, 0] == 1).all() and (enc.weights[:, PRICE, 0] == 0).all()
    assert enc.labels.tolist() == [0.0, 0.0] and enc.timestamps.tolist() == [0, 0]
    assert enc.item_ids.tolist() == ["i1", "i3"]


def test_encode_training_rows(spec: FeatureSpec) -> None:
    enc = encode(spec, train_table())
    assert len(enc) == 4
    assert enc.labels.dtype == np.float32 and enc.labels.tolist() == [1, 0, 1, 0]
    assert enc.timestamps.tolist() == [10, 20, 30, 40]
    assert enc.item_ids.tolist() == ["i1", "i2", "i2", "i3"]
    # Every field row sums to weight 1 except numeric fields.
    sums = enc.weights.sum(axis=2)
    np.testing.assert_allclose(np.delete(sums, PRICE, axis=1), 1.0, rtol=1e-6)
    sub = enc.take([3, 0])
    assert sub.item_ids.tolist() == ["i3", "i1"] and np.array_equal(sub.tokens[1], enc.tokens[0])


def test_encode_records_matches_encode(spec: FeatureSpec) -> None:
    table = train_table()
    records = table.to_pylist()
    records[1]["item"] = None
    del records[2]["city"]
    from_records = encode_records(spec, records)
    expected = encode(spec, pa.Table.from_pylist(records, schema=table.schema))
    assert np.array_equal(from_records.tokens, expected.tokens)
    assert np.array_equal(from_records.weights, expected.weights)
    assert np.array_equal(from_records.labels, expected.labels)
    assert np.array_equal(from_records.timestamps, expected.timestamps)


def test_encode_records_of_some_fields_leaves_the_others_padding(spec: FeatureSpec) -> None:
    records = train_table().to_pylist()
    full = encode_records(spec, records)
    some = {CAT, PRICE, CITY}
    part = encode_records(spec, records, fields=some)
    for j in range(spec.n_fields):
        if j in some:
            assert np.array_equal(part.tokens[:, j], full.tokens[:, j])
            assert np.array_equal(part.weights[:, j], full.weights[:, j])
        else:
            assert not part.tokens[:, j].any() and not part.weights[:, j].any()
    assert part.item_ids.tolist() == full.item_ids.tolist()
    # a field left out is not read at all: a bad value in it raises nothing
    encode_records(spec, [{"tags": "x|y", "city": "c1"}], fields={CITY})


def test_encode_records_item_only_and_non_string_ids(spec: FeatureSpec) -> None:
    enc = encode_records(spec, [{"item": "i2", "cat": "a", "tags": ["y"], "price": 3}, {"item": 7}])
    assert enc.item_ids.tolist() == ["i2", "7"]
    assert enc.tokens[0, ITEM, 0] == spec.fields[ITEM].offset + 1
    assert enc.tokens[1, ITEM, 0] == spec.fields[ITEM].offset  # unknown id 7 -> OOV
    assert enc.labels.tolist() == [0.0, 0.0]


def test_encode_records_rejects_joined_strings_and_nan(spec: FeatureSpec) -> None:
    with pytest.raises(DataError, match=r"multi column 'tags'.*lists"):
        encode_records(spec, [{"tags": "x|y"}])
    with pytest.raises(DataError, match="'price'"):
        encode_records(spec, [{"price": float("nan")}])
    with pytest.raises(DataError, match="'price'"):
        encode_records(spec, [{"price": "cheap"}])


def test_spec_round_trip_json_and_torch_weights_only(spec: FeatureSpec) -> None:
    data = spec.to_dict()
    assert FeatureSpec.from_dict(json.loads(json.dumps(data))) == spec
    buffer = io.BytesIO()
    torch.save({"feature_spec": data}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["feature_spec"]
    back = FeatureSpec.from_dict(loaded)
    assert back == spec
    rows = train_table()
    assert np.array_equal(encode(back, rows).tokens, encode(spec, rows).tokens)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(version=99),
        lambda d: d["fields"][1].update(offset=d["fields"][1]["offset"] + 1),
        lambda d: d["vocabs"]["cat"].pop(),
        lambda d: d["vocabs"]["cat"].__setitem__(0, "a"),
        lambda d: d["fields"].reverse(),
        lambda d: d["numeric_stats"].pop("price"),
        lambda d: d.pop("schema"),
    ],
)
def test_from_dict_rejects_inconsistent_specs(spec: FeatureSpec, tamper) -> None:
    data = json.loads(json.dumps(spec.to_dict()))
    tamper(data)
    with pytest.raises(ModelError, match="invalid feature spec"):
        FeatureSpec.from_dict(data)


def test_fit_needs_every_schema_column() -> None:
    with pytest.raises(DataError, match="no column 'city'"):
        FeatureSpec.fit(SCHEMA, train_table().drop_columns(["city"]))


def test_to_torch(spec: FeatureSpec) -> None:
    t = to_torch(encode(spec, train_table()), "cpu")
    assert t.tokens.dtype == torch.int64 and t.tokens.shape == (4, 6, 3)
    assert t.weights.dtype == torch.float32 and t.labels.dtype == torch.float32
    assert t.timestamps.dtype == torch.int64
    assert t.item_ids.tolist() == ["i1", "i2", "i2", "i3"]


tokens_st = st.lists(st.sampled_from(["x", "y", "z", "w", "new", "<oov>"]), max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.sampled_from(["i1", "i2", "i9"])),
            st.one_of(st.none(), tokens_st),
            st.one_of(st.none(), st.floats(-1e6, 1e6)),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_encoding_invariants(rows) -> None:
    spec = FeatureSpec.fit(SCHEMA, train_table())
    table = pa.table(
        {
            "item": pa.array([r[0] for r in rows], pa.string()),
            "tags": pa.array([r[1] for r in rows], pa.list_(pa.string())),
            "price": pa.array([r[2] for r in rows], pa.float64()),
        }
    )
    enc = encode(spec, table)
    for j, f in enumerate(spec.fields):
        used = enc.weights[:, j, :] != 0
        toks = enc.tokens[:, j, :]
        # Non-padding tokens stay inside the field's own rows; padding slots weigh 0.
        inside = (toks >= f.offset) & (toks < f.offset + f.size)
        assert (inside | (toks == 0)).all()
        assert (enc.weights[:, j, :][toks == 0] == 0).all()
        if f.kind != "numeric":
            np.testing.assert_allclose(enc.weights[:, j, :].sum(axis=1), 1.0, rtol=1e-5)
            assert used.sum(axis=1).max() <= f.max_len


def test_feature_columns_cache_items_by_id_and_features(spec: FeatureSpec) -> None:
    from emerg_stream.serving.engine import FeatureColumns
    from emerg_stream.stream.handler import ItemFeatures

    def item(i: str, cat: str, tags: list[str]) -> ItemFeatures:
        return ItemFeatures(i, {"cat": cat}, {"tags": tags}, {"price": 2.0})

    def fresh(items: list[ItemFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
        return FeatureColumns(spec, cache_items=0).encode_items(items)

    cols = FeatureColumns(spec, cache_items=2)
    a, b, c = item("i1", "a", ["x"]), item("i2", "b", ["y", "z"]), item("i3", "a", [])
    for batch in ([a, b], [b, a, b], [c, a], [a, item("i1", "b", ["z"])]):
        tokens, weights = cols.encode_items(batch)
        want_t, want_w = fresh(batch)
        assert torch.equal(tokens, want_t) and torch.equal(weights, want_w)
        assert not tokens[:, CITY].any()  # user fields: padding
        assert len(cols._cache) <= 2
    # the re-announced i1 (other features) replaced the cached one
    assert cols._cache["i1"][0] == item("i1", "b", ["z"])
    full = encode_records(spec, [cols.item_record(a)])
    tokens, _ = cols.encode_items([a])
    assert torch.equal(tokens[0, :USER], torch.from_numpy(full.tokens[0, :USER]))
