"""A tiny synthetic world for the worker's tests: a checkpoint, its items, their clicks.

Importable from any test (``tests/`` is on ``sys.path`` because ``tests/conftest.py`` has
no package around it). Everything is deterministic in the seed. :func:`offline_phis` is
the offline reference: the log encoded as an arrow table with
:func:`emerg_stream.features.encode`, φ⁰ from :func:`emerg_stream.meta.evaluate.cold_start`
and one :func:`emerg_stream.meta.warmup.warm_up` per K-row chunk, continuing from the
previous φ — the worker must publish exactly these params as versions 1, 2, 3, ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from emerg_stream.data.log import ColumnSpec, LogSchema
from emerg_stream.features import FeatureSpec, encode
from emerg_stream.io.records import Interaction, ItemEvent
from emerg_stream.meta.checkpoint import load_checkpoint, save_checkpoint
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.rows import Rows, item_set_from
from emerg_stream.meta.warmup import WarmupConfig, warm_up
from emerg_stream.model import ModelConfig, build_model

SCHEMA = LogSchema(
    item_id="item",
    user_id="user",
    label="label",
    timestamp="ts",
    item_features=(
        ColumnSpec("genre", "categorical", "item"),
        ColumnSpec("tags", "multi", "item", max_len=3),
        ColumnSpec("price", "numeric", "item"),
    ),
    user_features=(
        ColumnSpec("city", "categorical", "user"),
        ColumnSpec("age", "numeric", "user"),
    ),
)
GENRES = ["drama", "comedy", "horror", "docu"]
TAGS = ["a", "b", "c", "d", "e"]
CITIES = ["x", "y", "z"]
# Adam (a member of the selection grid): moves the graph too (~0.2), not just the id
WARMUP = WarmupConfig(steps=5, lr=0.01, optimizer="adam")
SALT = 7


@dataclass
class World:
    """Items and interactions in stream order, plus the log table they came from.

    Args:
        k: Rows per phase.
        items: ItemEvents (every new and some old items).
        interactions: Interactions in global event-time order.
        new_ids: New items.
        old_ids: Items of the training set (the checkpoint's old items).
        table: Every interaction as a log row (same order as ``interactions``).
    """

    k: int
    items: list[ItemEvent]
    interactions: list[Interaction]
    new_ids: list[str]
    old_ids: list[str]
    table: pa.Table

    def rows_of(self, item_id: str) -> list[Interaction]:
        """The item's interactions in stream order."""
        return [r for r in self.interactions if r["item_id"] == item_id]


def _item_features(rng: np.random.Generator, i: int) -> dict[str, Any]:
    genre = GENRES[i % len(GENRES)] if i % 5 else "unseen-genre"  # an OOV value too
    tags = [str(t) for t in rng.choice(TAGS, size=1 + i % 3, replace=False)]
    return {"genre": genre, "tags": tags, "price": float(rng.uniform(1, 20))}


def make_world(
    *, n_new: int = 10, n_old: int = 4, k: int = 4, seed: int = 0, rows: tuple[int, ...] = ()
) -> World:
    """A deterministic world.

    Args:
        n_new: New items ``n0..``.
        n_old: Old items ``o0..`` (in the checkpoint's training set; announced and clicked).
        k: Rows per phase.
        seed: Randomness.
        rows: Interactions per new item (cycled); default ``4K+3, 3K, 2K+1, 5K, K-1``.
    """
    rng = np.random.default_rng(seed)
    counts = rows or (4 * k + 3, 3 * k, 2 * k + 1, 5 * k, k - 1)
    new_ids = [f"n{i}" for i in range(n_new)]
    old_ids = [f"o{i}" for i in range(n_old)]
    feats = {iid: _item_features(rng, i) for i, iid in enumerate(new_ids + old_ids)}
    plan: list[tuple[int, str]] = []  # (time, item)
    for i, iid in enumerate(new_ids):
        n = counts[i % len(counts)]
        start = int(rng.integers(0, 50))
        plan += [(start + 3 * j + int(rng.integers(0, 3)), iid) for j in range(n)]
    for iid in old_ids:
        plan += [(int(rng.integers(0, 100)), iid) for _ in range(3)]
    plan.sort(key=lambda t: (t[0], t[1]))
    items: list[ItemEvent] = []
    interactions: list[Interaction] = []
    cols: dict[str, list[Any]] = {c: [] for c in ("item", "user", "label", "ts", "genre", "tags")}
    cols.update({"price": [], "city": [], "age": []})
    seen: set[str] = set()
    for row, (t, iid) in enumerate(plan):
        f = feats[iid]
        t_ms = 1_700_000_000_000 + t * 1000
        if iid not in seen:
            seen.add(iid)
            items.append(
                {
                    "item_id": iid,
                    "categorical": {"genre": f["genre"]},
                    "multi": {"tags": list(f["tags"])},
                    "numeric": {"price": f["price"]},
                    "event_time": t_ms,
                }
            )
        user = f"u{int(rng.integers(0, 30))}"
        city, age = CITIES[int(user[1:]) % 3], float(20 + int(user[1:]))
        label = int(rng.random() < 0.4)
        interactions.append(
            {
                "event_id": f"ev-{row}",
                "item_id": iid,
                "user_id": user,
                "categorical": {"city": city},
                "multi": {},
                "numeric": {"age": age},
                "label": label,
                "event_time": t_ms,
            }
        )
        for name, value in (
            ("item", iid),
            ("user", user),
            ("label", label),
            ("ts", t_ms),
            ("genre", f["genre"]),
            ("tags", f["tags"]),
            ("price", f["price"]),
            ("city", city),
            ("age", age),
        ):
            cols[name].append(value)
    table = pa.table(
        {
            "item": pa.array(cols["item"], pa.string()),
            "user": pa.array(cols["user"], pa.string()),
            "label": pa.array(cols["label"], pa.int8()),
            "ts": pa.array(cols["ts"], pa.int64()),
            "genre": pa.array(cols["genre"], pa.string()),
            "tags": pa.array(cols["tags"], pa.list_(pa.string())),
            "price": pa.array(cols["price"], pa.float64()),
            "city": pa.array(cols["city"], pa.string()),
            "age": pa.array(cols["age"], pa.float64()),
        }
    )
    return World(k, items, interactions, new_ids, old_ids, table)


def build_checkpoint(world: World, path: Path, *, seed: int = 0, method: str = "emerg") -> Path:
    """A tiny, untrained checkpoint of ``method`` whose old items are the world's ``o*``.

    The spec is fitted on the old items' rows plus a few synthetic training rows, so
    some new items' values are out of vocabulary.
    """
    mask = np.isin(np.asarray(world.table.column("item").to_pylist()), world.old_ids)
    train = world.table.filter(pa.array(mask))
    spec = FeatureSpec.fit(SCHEMA, train)
    torch.manual_seed(seed)
    config = ModelConfig(
        kind=method,
        n_fields=spec.n_fields,
        n_item_fields=spec.n_item_fields,
        side_fields=tuple(j for j, f in enumerate(spec.fields) if f.side == "item" and j),
        vocab_size=spec.total_size,
        dim=8,
        layers=2,
        heads=2,
        head_dim=4,
        hyper_hidden=16,
        # the baselines: a small deep part, and fresh ID embeddings large enough to matter
        **({} if method == "emerg" else {"mlp_hidden": (16, 8), "id_init_std": 0.3}),
    )
    model = build_model(config)
    generator = getattr(model, "generator", None) or getattr(model, "id_generator", None)
    with torch.no_grad():  # a less uniform random graph (or ID) generator than the default
        for p in generator.parameters() if generator is not None else ():
            p.mul_(3.0)
    save_checkpoint(
        path,
        model.eval(),
        spec.to_dict(),
        {
            "method": method,
            "dataset": "tiny",
            "seed": seed,
            "noise_salt": SALT,
            "warmup": asdict(WARMUP),
            "split": {"n": 1000, "k": world.k},
            "old_item_ids": list(world.old_ids),
        },
    )
    return path


def offline_phis(world: World, checkpoint: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Offline reference: item -> [φ of version 1 (cold), version 2, ...] (float32 numpy)."""
    ck = load_checkpoint(checkpoint)
    spec = FeatureSpec.from_dict(ck.feature_spec)
    mask = np.isin(np.asarray(world.table.column("item").to_pylist()), world.new_ids)
    enc = encode(spec, world.table.filter(pa.array(mask)))
    items, row_item = item_set_from(enc)
    device = torch.device("cpu")
    phi = cold_start(ck.model, items, salt=SALT, device=device)
    out = {
        iid: [{k: v[i].numpy().copy() for k, v in phi.items()}] for i, iid in enumerate(items.ids)
    }
    row_item = np.asarray(row_item)
    # position of each row within its item (rows are in stream order already)
    pos = np.zeros(len(row_item), dtype=np.int64)
    seen: dict[int, int] = {}
    for r, i in enumerate(row_item):
        pos[r] = seen.get(int(i), 0)
        seen[int(i)] = pos[r] + 1
    chunk = 0
    while True:
        sel = np.flatnonzero(pos // world.k == chunk)
        counts = np.bincount(row_item[sel], minlength=len(items))
        full = np.flatnonzero(counts == world.k)
        if full.size == 0:
            break
        keep = sel[np.isin(row_item[sel], full)]
        remap = -np.ones(len(items), dtype=np.int64)
        remap[full] = np.arange(full.size)
        rows = Rows(
            torch.from_numpy(enc.tokens[keep]),
            torch.from_numpy(enc.weights[keep]),
            torch.from_numpy(enc.labels[keep].astype(np.float32)),
            torch.from_numpy(remap[row_item[keep]]),
        )
        idx = torch.from_numpy(full)
        # autograd: the reference the worker's default backend (the CPU kernel) must meet
        new = warm_up(
            ck.model, {k: v[idx] for k, v in phi.items()}, rows, WARMUP, backend="autograd"
        )
        for k in phi:
            phi[k] = phi[k].clone()
            phi[k][idx] = new[k]
        for i in full:
            out[items.ids[i]].append({k: v[i].numpy().copy() for k, v in phi.items()})
        chunk += 1
    return out
