"""``synthetic-pairs``: a seeded click log whose clicks depend on an item-specific field pair.

EmerG's premise in one generator: each item *category* has its own active interaction
between one user field and one item field, and the true click probability of every
row is known, so a method can be measured against the oracle that scores rows with it.

For a row of user ``u`` and item ``i`` of category ``c`` whose active pair is
(user field ``p_c``, item field ``q_c``)::

    logit = base + b_item[i] + b_user[u]
            + M_c[ u.p_c , i.q_c ]        # the category's pair: predictable from side features
            + t_i[ u.p_c ]                # the item's own taste over the same user field
    p_true = sigmoid(logit);  label ~ Bernoulli(p_true)

``M_c`` is a ``values x values`` matrix with entries ``N(0, pair_std²)`` (one per
category); ``t_i`` a vector of ``values`` entries ``N(0, taste_std²)`` per item, which
side features cannot predict and only the item's clicks reveal; ``b_item ~ N(0,
item_bias_std²)``, ``b_user ~ N(0, user_bias_std²)``. The active pairs are distinct
(user field, item field) combinations drawn once per seed (:func:`active_pairs`).

Items: ``old_items`` with N + 1 .. ``old_rows_max`` rows each, ``new_items`` with
3K + (N - 3K) // 3 .. N rows (the public split's new items, each with some test rows),
each with an id, its category and ``item_fields`` attribute fields. Users: ``users``
with an id and ``user_fields`` attribute fields; each row draws its user uniformly.
Old items launch in the first half of the time line, new ones in the second; an item's
rows follow its launch in time order. The public split
(:func:`emerg_stream.data.split.split_log`) applies unchanged.

The log carries one extra column, :data:`TRUE_P` (``float64``), the true click
probability of each row; it is not a feature (the schema does not name it) and rides
along through the split, so the oracle's metrics come from the split's test rows.

Use it wherever a dataset is named: ``synthetic-pairs`` (the defaults) or with
parameters, ``synthetic-pairs:seed=1,new_items=600,pair_std=2.0`` (the fields of
:class:`SyntheticPairsConfig`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from emerg_stream.data.log import ColumnSpec, InteractionLog, LogSchema
from emerg_stream.errors import ConfigError
from emerg_stream.phases import WarmupSchedule

#: The preset name (and the prefix of a parameterised name).
NAME = "synthetic-pairs"
#: The column holding each row's true click probability.
TRUE_P = "p_true"


@dataclass(frozen=True)
class SyntheticPairsConfig:
    """The generator's parameters (module docstring).

    Args:
        seed: Seed of everything drawn.
        old_items: Items with more than ``n`` rows (pretraining and meta-training).
        new_items: Items with ``3k + (n - 3k) // 3`` .. ``n`` rows.
        users: Distinct users.
        categories: Item categories, each with its own active field pair.
        item_fields: Item attribute fields (besides the id and the category).
        user_fields: User attribute fields (besides the id).
        values: Distinct values of each attribute field.
        old_rows_max: Old items have ``n + 1`` .. ``old_rows_max`` rows.
        n: The split's N.
        k: The split's K.
        base: Logit of the global click rate.
        item_bias_std: Spread of the item bias.
        user_bias_std: Spread of the user bias.
        pair_std: Spread of the entries of each category's pair matrix ``M_c``.
        taste_std: Spread of each item's own taste ``t_i``.
    """

    seed: int = 0
    old_items: int = 400
    new_items: int = 800
    users: int = 1500
    categories: int = 4
    item_fields: int = 3
    user_fields: int = 3
    values: int = 6
    old_rows_max: int = 240
    n: int = 60
    k: int = 10
    base: float = -0.2
    item_bias_std: float = 0.5
    user_bias_std: float = 0.5
    pair_std: float = 1.2
    taste_std: float = 0.8

    def __post_init__(self) -> None:
        positive = ("old_items", "new_items", "users", "categories", "item_fields")
        for name in (*positive, "user_fields", "values", "n", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{NAME}: {name} must be at least 1, got {getattr(self, name)}")
        need = WarmupSchedule(self.k).protocol_rows
        if self.n < need:
            raise ConfigError(f"{NAME}: n ({self.n}) must be at least 3*k ({need})")
        if self.old_rows_max <= self.n:
            raise ConfigError(f"{NAME}: old_rows_max must exceed n ({self.n})")
        if self.categories > self.item_fields * self.user_fields:
            raise ConfigError(
                f"{NAME}: {self.categories} categories need as many distinct field pairs; "
                f"only {self.item_fields * self.user_fields} exist"
            )
        for name in ("item_bias_std", "user_bias_std", "pair_std", "taste_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{NAME}: {name} must not be negative")


def parse_name(name: str) -> SyntheticPairsConfig | None:
    """The config a dataset name asks for, or ``None`` when it is not this generator's.

    Args:
        name: ``synthetic-pairs`` or ``synthetic-pairs:key=value,key=value``.

    Raises:
        ConfigError: An unknown key or a value of the wrong type.
    """
    head, sep, tail = name.partition(":")
    if head != NAME:
        return None
    if not sep:
        return SyntheticPairsConfig()
    types = {f.name: f.type for f in fields(SyntheticPairsConfig)}
    values: dict[str, int | float] = {}
    for part in filter(None, tail.split(",")):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise ConfigError(f"{name!r}: {part!r} is not key=value with a key of {sorted(types)}")
        try:
            values[key] = int(raw) if types[key] == "int" else float(raw)
        except ValueError as exc:
            kind = "an integer" if types[key] == "int" else "a number"
            raise ConfigError(f"{name!r}: {key} needs {kind}, got {raw!r}") from exc
    return SyntheticPairsConfig(**values)  # type: ignore[arg-type]


def active_pairs(cfg: SyntheticPairsConfig) -> list[tuple[int, int]]:
    """Each category's active (user field, item field) pair, as attribute indices."""
    rng = np.random.default_rng([cfg.seed, 1])
    combos = list(itertools.product(range(cfg.user_fields), range(cfg.item_fields)))
    pick = rng.permutation(len(combos))[: cfg.categories]
    return [combos[int(j)] for j in pick]


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-x))
    return out


@dataclass(frozen=True)
class World:
    """Items and users of one seed, with what decides their clicks (module docstring).

    Items ``0 .. old_items - 1`` are the old ones, the rest the new ones; in the log,
    item ``j`` is ``item<j>`` and user ``u`` is ``user<u>``.

    Args:
        pairs: Per category, its active (user field, item field), attribute indices.
        category: ``[I]`` each item's category.
        item_attr: ``[I, item_fields]`` attribute values.
        item_bias: ``[I]``.
        taste: ``[I, values]`` each item's own taste over its active user field.
        pair_m: ``[categories, values, values]``, ``M_c[user value, item value]``.
        user_attr: ``[U, user_fields]`` attribute values.
        user_bias: ``[U]``.
        base: Logit of the global click rate.
    """

    pairs: tuple[tuple[int, int], ...]
    category: npt.NDArray[np.int64]
    item_attr: npt.NDArray[np.int64]
    item_bias: npt.NDArray[np.float64]
    taste: npt.NDArray[np.float64]
    pair_m: npt.NDArray[np.float64]
    user_attr: npt.NDArray[np.int64]
    user_bias: npt.NDArray[np.float64]
    base: float

    def logit(
        self, item: npt.NDArray[np.int64], user: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """The true click logit of (item, user) pairs, ``[N]`` each."""
        cat = self.category[item]
        p_field = np.array([p for p, _ in self.pairs])[cat]
        q_field = np.array([q for _, q in self.pairs])[cat]
        u_val = self.user_attr[user, p_field]
        i_val = self.item_attr[item, q_field]
        out: npt.NDArray[np.float64] = (
            self.additive_logit(item, user)
            + self.pair_m[cat, u_val, i_val]
            + self.taste[item, u_val]
        )
        return out

    def additive_logit(
        self, item: npt.NDArray[np.int64], user: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """The logit without any interaction: base + item bias + user bias."""
        out: npt.NDArray[np.float64] = self.base + self.item_bias[item] + self.user_bias[user]
        return out


def draw_world(cfg: SyntheticPairsConfig) -> World:
    """The items and users of ``cfg.seed`` (the same config always gives the same world)."""
    rng = np.random.default_rng([cfg.seed, 0])
    n_items = cfg.old_items + cfg.new_items
    return World(
        pairs=tuple(active_pairs(cfg)),
        category=rng.integers(0, cfg.categories, n_items),
        item_attr=rng.integers(0, cfg.values, (n_items, cfg.item_fields)),
        item_bias=rng.normal(0.0, cfg.item_bias_std, n_items),
        taste=rng.normal(0.0, cfg.taste_std, (n_items, cfg.values)),
        pair_m=rng.normal(0.0, cfg.pair_std, (cfg.categories, cfg.values, cfg.values)),
        user_attr=rng.integers(0, cfg.values, (cfg.users, cfg.user_fields)),
        user_bias=rng.normal(0.0, cfg.user_bias_std, cfg.users),
        base=cfg.base,
    )


def row_indices(
    table: pa.Table, schema: LogSchema
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Each row's item and user index in the :class:`World` (from ``item<j>``/``user<u>``)."""
    item = table.column(schema.item_id).to_pylist()
    user = table.column(schema.user_id).to_pylist()
    return (
        np.array([int(i.removeprefix("item")) for i in item], dtype=np.int64),
        np.array([int(u.removeprefix("user")) for u in user], dtype=np.int64),
    )


def generate(cfg: SyntheticPairsConfig, name: str = NAME) -> InteractionLog:
    """Draw the log (module docstring); the same config always gives the same table.

    Args:
        cfg: The parameters.
        name: The log's name.

    Returns:
        The log, with the extra column :data:`TRUE_P`.
    """
    world = draw_world(cfg)
    rng = np.random.default_rng([cfg.seed, 2])
    n_items = cfg.old_items + cfg.new_items
    protocol = WarmupSchedule(cfg.k).protocol_rows
    # new items: 3K + (N - 3K) // 3 .. N rows, so each has a few test rows at least
    rows_per_item = np.concatenate(
        [
            rng.integers(cfg.n + 1, cfg.old_rows_max + 1, cfg.old_items),
            rng.integers(protocol + (cfg.n - protocol) // 3, cfg.n + 1, cfg.new_items),
        ]
    )
    item = np.repeat(np.arange(n_items), rows_per_item)
    user = rng.integers(0, cfg.users, len(item))
    # time: old items launch in [0, 1e6), new ones in [1e6, 2e6); rows follow in order
    launch = np.where(
        np.arange(n_items) < cfg.old_items,
        rng.integers(0, 1_000_000, n_items),
        rng.integers(1_000_000, 2_000_000, n_items),
    )
    gaps = rng.integers(1, 600, len(item))
    starts = np.concatenate([[0], np.cumsum(rows_per_item)[:-1]])
    cum = np.cumsum(gaps)
    ts = launch[item] + cum - (cum[starts] - gaps[starts])[item]
    p_true = _sigmoid(world.logit(item, user))
    label = (rng.random(len(item)) < p_true).astype(np.int8)
    category, item_attr, user_attr = world.category, world.item_attr, world.user_attr

    def strings(prefix: str, codes: npt.NDArray[np.int64]) -> pa.Array:
        return pa.array([f"{prefix}{c}" for c in codes.tolist()], pa.string())

    columns: dict[str, pa.Array] = {
        "item": strings("item", item),
        "user": strings("user", user),
        "label": pa.array(label, pa.int8()),
        "ts": pa.array(ts.astype(np.int64), pa.int64()),
        "category": strings("c", category[item]),
    }
    for j in range(cfg.item_fields):
        columns[f"item_attr{j}"] = strings("v", item_attr[item, j])
    for j in range(cfg.user_fields):
        columns[f"user_attr{j}"] = strings("v", user_attr[user, j])
    columns[TRUE_P] = pa.array(p_true, pa.float64())
    item_features = (
        ColumnSpec("category", "categorical", "item"),
        *(ColumnSpec(f"item_attr{j}", "categorical", "item") for j in range(cfg.item_fields)),
    )
    user_features = tuple(
        ColumnSpec(f"user_attr{j}", "categorical", "user") for j in range(cfg.user_fields)
    )
    schema = LogSchema(
        item_id="item",
        user_id="user",
        label="label",
        timestamp="ts",
        item_features=item_features,
        user_features=user_features,
    )
    params = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
    return InteractionLog(
        name=name,
        table=pa.table(columns),
        schema=schema,
        n=cfg.n,
        k=cfg.k,
        # no input file: the generator and its parameters are the source
        sources={f"{NAME}:{params}": hashlib.sha256(params.encode()).hexdigest()},
    )
