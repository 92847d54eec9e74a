"""RankerClient without a broker: version rules, model-version refusal, offline parity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emerg_stream.data.log import InteractionLog
from emerg_stream.data.split import split_log
from emerg_stream.errors import ModelError
from emerg_stream.features import FeatureSpec, encode_records, to_torch
from emerg_stream.io.records import ItemParams
from emerg_stream.meta.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from emerg_stream.meta.evaluate import cold_start, predict, run_phases
from emerg_stream.meta.pipeline import model_config, prepare
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.model import build_model
from emerg_stream.model.base import Phi
from emerg_stream.serving.ranker import RankerClient, UnknownItemError, flat_features

NOWHERE = {"bootstrap.servers": "127.0.0.1:9"}  # never contacted by these tests


def tiny_rows() -> list[tuple[str, str, int, int]]:
    rng = np.random.default_rng(0)
    rows = []
    for item, n_rows in [("o1", 12), ("o2", 11), ("o3", 14), ("n1", 8), ("n2", 7), ("n3", 9)]:
        for j in range(n_rows):
            rows.append((item, f"u{rng.integers(6)}", int(rng.integers(1000)), int(j % 3 == 0)))
    return rows


@pytest.fixture
def setup(
    make_log: Callable[..., InteractionLog], tmp_path: Path
) -> tuple[InteractionLog, Checkpoint, Path]:
    ilog = make_log(tiny_rows(), n=9, k=2, name="tiny")
    split = split_log(ilog)
    spec = FeatureSpec.fit(split.schema, split.old)
    torch.manual_seed(0)
    model = build_model(model_config("emerg", spec, layers=2)).eval()
    old_ids = sorted({r[0] for r in tiny_rows() if r[0].startswith("o")})
    meta = {
        "noise_salt": 3,
        "old_item_ids": old_ids,
        "warmup": {"steps": 3, "lr": 0.5},
        "split": {"k": 2},
    }
    save_checkpoint(tmp_path / "ck", model, spec.to_dict(), meta)
    return ilog, load_checkpoint(tmp_path / "ck"), tmp_path / "ck"


def params(ck: Checkpoint, item: str, version: int, phi: Phi, j: int, **kw: Any) -> ItemParams:
    rec: ItemParams = {
        "item_id": item,
        "version": version,
        "phase": "warm_a",
        "support_size": 2,
        "model_version": ck.model_version,
        "method": ck.method.name,
        "n_fields": ck.model.config.n_fields,
        "adjacency": phi["adj"][j].flatten().tolist(),
        "id_embedding": phi["id"][j].tolist(),
        "source_offsets": [],
        "produced_time": 0,
    }
    rec.update(kw)  # type: ignore[typeddict-item]
    return rec


def rows_as_dicts(ilog: InteractionLog, table_rows: list[int]) -> tuple[list[dict[str, Any]], ...]:
    t = ilog.table.to_pylist()
    s = ilog.schema
    users = [
        {c: t[r][c] for c in [s.user_id, *(f.name for f in s.user_features)]} for r in table_rows
    ]
    items = [{f.name: t[r][f.name] for f in s.item_features} for r in table_rows]
    return users, items


def test_newest_version_wins_and_older_never_overwrites(
    setup: tuple[InteractionLog, Checkpoint, Path],
) -> None:
    _, ck, _ = setup
    ranker = RankerClient(ck, NOWHERE, "params")
    f, d = ck.model.config.n_fields, ck.model.config.dim
    phi = {"adj": torch.randn(3, f, f), "id": torch.randn(3, d)}
    assert ranker.apply(params(ck, "n1", 2, phi, 0))
    assert not ranker.apply(params(ck, "n1", 1, phi, 1))  # older, arrives later
    assert not ranker.apply(params(ck, "n1", 2, phi, 2))  # same version again
    assert ranker.version("n1") == 2 and ranker.stale == 2
    assert ranker.apply(params(ck, "n1", 5, phi, 1, phase="warm_c"))
    assert ranker.version("n1") == 5 and ranker.phase("n1") == "warm_c"
    assert len(ranker) == 1


def test_params_of_another_model_version_are_refused(
    setup: tuple[InteractionLog, Checkpoint, Path],
) -> None:
    _, ck, _ = setup
    ranker = RankerClient(ck, NOWHERE, "params")
    f, d = ck.model.config.n_fields, ck.model.config.dim
    phi = {"adj": torch.randn(1, f, f), "id": torch.randn(1, d)}
    with pytest.raises(ModelError) as err:
        ranker.apply(params(ck, "n1", 1, phi, 0, model_version="0123456789abcdef"))
    assert "0123456789abcdef" in str(err.value) and ck.model_version in str(err.value)
    assert ranker.version("n1") is None
    with pytest.raises(ModelError, match="do not fit"):
        ranker.apply(params(ck, "n1", 1, phi, 0, adjacency=[0.0] * 3))


def test_scores_equal_offline_predict_with_the_same_phi(
    setup: tuple[InteractionLog, Checkpoint, Path],
) -> None:
    ilog, ck, ck_dir = setup
    split = split_log(ilog)
    spec = FeatureSpec.from_dict(ck.feature_spec)
    data = prepare(split, spec)
    _, phis = run_phases(
        ck.model, data.new, WarmupConfig(steps=3, lr=0.5), salt=3, device=torch.device("cpu")
    )
    phi = phis["warm_b"]
    offline = predict(ck.model, data.new.test, phi, device=torch.device("cpu"))

    ranker = RankerClient(ck_dir, NOWHERE, "params")  # loads the checkpoint itself
    for j, item in enumerate(data.new.items.ids):
        assert ranker.apply(params(ck, item, 3, phi, j, phase="warm_b"))
    seq = split.test.column("seq").to_pylist()
    users, items = rows_as_dicts(ilog, seq)
    ids = split.test.column("item").to_pylist()
    scores = ranker.score(users, ids, item_features=items)
    np.testing.assert_allclose(scores, offline, rtol=1e-5, atol=1e-6)


def test_unknown_items_cold_start_from_features_or_fail_clearly(
    setup: tuple[InteractionLog, Checkpoint, Path],
) -> None:
    ilog, ck, _ = setup
    split = split_log(ilog)
    spec = FeatureSpec.from_dict(ck.feature_spec)
    data = prepare(split, spec)
    ranker = RankerClient(ck, NOWHERE, "params")
    with pytest.raises(UnknownItemError, match="n1"):
        ranker.score([{"user": "u1"}], ["n1"])
    # cold start: the same φ⁰ the offline protocol (and the worker's version 1) uses
    phi0 = cold_start(ck.model, data.new.items, salt=3, device=torch.device("cpu"))
    offline = predict(ck.model, data.new.test, phi0, device=torch.device("cpu"))
    seq = split.test.column("seq").to_pylist()
    users, items = rows_as_dicts(ilog, seq)
    first_rows = split.warm_a.column("seq").to_pylist()
    _, firsts = rows_as_dicts(ilog, first_rows)
    for item, feats in zip(split.warm_a.column("item").to_pylist(), firsts, strict=True):
        if item not in ranker._features:
            ranker.remember_item(
                {
                    "item_id": item,
                    "categorical": {"cat": feats["cat"]},
                    "multi": {"tags": feats["tags"]},
                    "numeric": {"price": feats["price"]},
                    "event_time": 0,
                }
            )
    scores = ranker.score(users, split.test.column("item").to_pylist(), item_features=items)
    np.testing.assert_allclose(scores, offline, rtol=1e-5, atol=1e-6)


def test_old_items_use_their_trained_params(
    setup: tuple[InteractionLog, Checkpoint, Path],
) -> None:
    ilog, ck, _ = setup
    ranker = RankerClient(ck, NOWHERE, "params")
    t = ilog.table.to_pylist()
    r = next(i for i, row in enumerate(t) if row["item"] == "o2")
    users, items = rows_as_dicts(ilog, [r])
    got = ranker.score(users, ["o2"], item_features=items)
    spec = FeatureSpec.from_dict(ck.feature_spec)
    enc = to_torch(encode_records(spec, [t[r]]))
    with torch.no_grad():
        phi = ck.model.trained_params(enc.tokens, enc.weights)
        want = torch.sigmoid(ck.model(enc.tokens, enc.weights, phi, torch.tensor([0])))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_one_user_broadcast_over_items_and_flat_features(
    setup: tuple[InteractionLog, Checkpoint, Path],
) -> None:
    _, ck, _ = setup
    ranker = RankerClient(ck, NOWHERE, "params")
    feats = {"cat": "n", "tags": ["tn"], "price": 1.0}
    out = ranker.score([{"user": "u1", "city": "1"}], ["n1", "n2"], item_features=[feats, feats])
    assert out.shape == (2,) and out.dtype == np.float32 and np.all((out > 0) & (out < 1))
    with pytest.raises(ValueError, match="user feature"):
        ranker.score([{"user": "u1"}] * 3, ["n1", "n2"], item_features=[feats, feats])
    assert flat_features({"categorical": {"a": "x"}, "multi": {"b": ["y"]}, "numeric": {}}) == {
        "a": "x",
        "b": ["y"],
    }
