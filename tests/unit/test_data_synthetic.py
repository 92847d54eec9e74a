"""The ``synthetic-pairs`` generator: its labels follow its probabilities, its split is valid."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyarrow.compute as pc
import pytest

from emerg_stream.data import load_dataset, split_log
from emerg_stream.data.synthetic import (
    TRUE_P,
    SyntheticPairsConfig,
    draw_world,
    generate,
    parse_name,
    row_indices,
)
from emerg_stream.errors import ConfigError

SMALL = "synthetic-pairs:old_items=30,new_items=50,users=200,seed=3"


def test_labels_follow_the_true_probabilities():
    cfg = SyntheticPairsConfig(seed=1, old_items=150, new_items=100)
    log = generate(cfg)
    world = draw_world(cfg)
    item, user = row_indices(log.table, log.schema)
    p = log.table.column(TRUE_P).to_numpy()
    y = log.table.column("label").to_numpy().astype(float)
    # the column is the world's probability of that very (item, user) row
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-world.logit(item, user))), rtol=1e-12)
    assert len(p) > 25_000 and p.std() > 0.15  # spread out: the deciles below differ
    # and the labels are Bernoulli(p): in every decile of p the click rate is p's mean
    edges = np.quantile(p, np.linspace(0, 1, 11))
    for lo, hi in itertools.pairwise(edges):
        m = (p >= lo) & (p < hi)
        se = np.sqrt(np.sum(p[m] * (1 - p[m]))) / m.sum()
        assert abs(y[m].mean() - p[m].mean()) < 4 * se, (lo, hi)


def test_each_category_has_its_own_active_pair():
    cfg = SyntheticPairsConfig(seed=2)
    world = draw_world(cfg)
    assert len(set(world.pairs)) == cfg.categories  # distinct pairs
    users = np.arange(cfg.users)
    for c, (p_field, _) in enumerate(world.pairs):
        items = np.flatnonzero(world.category == c)[:20]
        it, us = np.repeat(items, len(users)), np.tile(users, len(items))
        base = world.logit(it, us)
        for f in range(cfg.user_fields):
            attr = world.user_attr.copy()
            attr[:, f] = (attr[:, f] + 1) % cfg.values
            moved = dataclasses.replace(world, user_attr=attr).logit(it, us)
            if f == p_field:  # the active user field moves the click probability
                assert np.abs(moved - base).mean() > 0.3
            else:  # the others do not, for this category's items
                np.testing.assert_array_equal(moved, base)


def test_the_public_split_applies_unchanged():
    log = load_dataset(SMALL)
    cfg = parse_name(SMALL)
    assert cfg is not None and log.name == SMALL
    split = split_log(log)
    counts = split.item_counts()
    assert counts["old"] == cfg.old_items and split.dropped_items == 0
    assert counts["warm_a"] == counts["warm_c"] == counts["test"] == cfg.new_items
    for part in ("warm_a", "warm_b", "warm_c"):
        assert split.part(part).num_rows == cfg.k * cfg.new_items
    assert split.row_counts()["old"] > cfg.n * cfg.old_items
    test = split.test
    assert TRUE_P in test.column_names  # the oracle rides along to the test rows
    # time order: each new item's rows go warm_a, warm_b, warm_c, test, ascending
    times: dict[str, list[int]] = {}
    for part in ("warm_a", "warm_b", "warm_c", "test"):
        t = split.part(part)
        for i, s in zip(t.column("item").to_pylist(), t.column("ts").to_pylist(), strict=True):
            times.setdefault(i, []).append(s)
    assert all(ts == sorted(ts) for ts in times.values())
    # new items launch after the old ones
    old_ts = pc.max(split.old.column("ts")).as_py()
    assert pc.min(split.warm_a.column("ts")).as_py() >= 1_000_000 > old_ts - 1_000_000


def test_seeded():
    a = load_dataset(SMALL).table
    assert a.equals(load_dataset(SMALL).table)
    b = load_dataset(SMALL.replace("seed=3", "seed=4")).table
    assert not a.column(TRUE_P).equals(b.column(TRUE_P))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("synthetic-pairs:colours=3", "not key=value"),
        ("synthetic-pairs:seed", "not key=value"),
        ("synthetic-pairs:users=many", "users needs an integer"),
        ("synthetic-pairs:categories=10", "10 categories need as many distinct field pairs"),
        ("synthetic-pairs:n=20,k=10", r"n \(20\) must be at least 3\*k"),
        ("synthetic-pairs-x", "unknown dataset"),
    ],
)
def test_bad_names_are_clear_errors(name: str, match: str):
    with pytest.raises(ConfigError, match=match):
        load_dataset(name)
