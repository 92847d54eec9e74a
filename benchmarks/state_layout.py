"""The item state's memory layout, measured for ``state.py``: before (up to v1) and after.

:class:`LegacyRecentIds` and :class:`LegacyItemTask` keep the layout before ItemState v2
for the comparison; :func:`build` fills a store of either layout, :func:`bytes_per_item`
measures its resident bytes, :func:`encode_v1` the old changelog value, and
:func:`dedupe_add_us` the event-id dedupe's cost.
"""

from __future__ import annotations

import gc
import io
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np

from emerg_stream.io.avro import frame
from emerg_stream.io.schemas import load_manifest
from emerg_stream.state import COMMON, ItemTask, RecentIds
from emerg_stream.state.codec import ItemStateCodec

#: Partitions of the changelog topic (the items' offset marks spread over them).
PARTITIONS = 2


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_bytes(build: Callable[[], Any]) -> tuple[int, Any]:
    """RSS growth while holding what ``build()`` returns (gc'd before and after)."""
    gc.collect()
    before = rss_bytes()
    obj = build()
    gc.collect()
    return rss_bytes() - before, obj


# -- the layout before ItemState v2, for the comparison -----------------------------------


class LegacyRecentIds:
    """Event ids as strings in a deque and a set (the window up to ItemState v1)."""

    __slots__ = ("_order", "_set", "window")

    def __init__(self, window: int, ids: Iterable[str] = ()) -> None:
        self.window = window
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        for i in ids:
            self.add(i)

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; False if it was remembered (as ``RecentIds.add``)."""
        if event_id in self._set:
            return False
        self._order.append(event_id)
        self._set.add(event_id)
        if len(self._order) > self.window:
            self._set.discard(self._order.popleft())
        return True


@dataclass(slots=True)
class LegacyItemTask:
    """The item state's in-memory form up to ItemState v1."""

    item_id: str
    categorical: dict[str, str] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)
    phase: str = "cold"
    version: int = 0
    support_size: int = 0
    next_threshold: int = 0
    support: list[bytes] = field(default_factory=list)
    recent: LegacyRecentIds = field(default_factory=lambda: LegacyRecentIds(1000))
    adjacency: np.ndarray | None = None
    id_embedding: np.ndarray | None = None
    last_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    updated_time: int = 0


# -- building the states --------------------------------------------------------------------


@dataclass
class Spec:
    """What the states are built from."""

    items: list[Any]
    clicks: list[Any]
    k: int
    f: int
    d: int


def event_ids(i: int, k: int, recent: int) -> list[str]:
    """The ids in item ``i``'s window (its last ``recent`` of ``5K-1`` clicks)."""
    return [f"ml-100k:{i * 5 * k + j}" for j in range(5 * k - 1 - recent, 5 * k - 1)]


def build(
    n: int, spec: Spec, codec: ItemStateCodec, recent: int, *, legacy: bool = False
) -> dict[str, Any]:
    """``n`` full item states (see the module docstring), ``recent`` event ids each."""
    rng = np.random.default_rng(0)
    k, f, d = spec.k, spec.f, spec.d
    out: dict[str, Any] = {}
    for i in range(n):
        item = spec.items[i % len(spec.items)]
        item_id = f"item-{i:07d}"
        support = []
        for j in range(k - 1):
            row = dict(spec.clicks[(i * k + j) % len(spec.clicks)])
            row["event_id"] = f"ml-100k:{i * 5 * k + 4 * k + j}"
            support.append(codec.encode_row(row))
        ids = event_ids(i, k, recent)
        adjacency = rng.standard_normal(f * f).astype(np.float32)
        id_embedding = rng.standard_normal(d).astype(np.float32)
        common: dict[str, Any] = {
            "item_id": item_id,
            "categorical": dict(item["categorical"]),
            "multi": {kk: list(v) for kk, v in item["multi"].items()},
            "numeric": dict(item["numeric"]),
            "phase": COMMON,
            "version": 5,
            "support_size": 5 * k - 1,
            "next_threshold": 5 * k,
            "support": support,
            "last_offsets": {
                ("emerg.items", i % PARTITIONS): i,
                ("emerg.interactions", i % PARTITIONS): 5 * k * i,
            },
            "updated_time": 1_700_000_000_000 + i,
        }
        if legacy:
            out[item_id] = LegacyItemTask(
                **common,
                recent=LegacyRecentIds(codec.dedupe_window, ids),
                adjacency=adjacency.copy(),
                id_embedding=id_embedding.copy(),
            )
        else:
            out[item_id] = ItemTask(
                **common,
                recent=RecentIds(codec.dedupe_window, ids),
                adjacency=adjacency,
                id_embedding=id_embedding,
            )
    return out


def encode_v1(task: ItemTask, ids: list[str], codec: ItemStateCodec, parsed: Any) -> bytes:
    """``task`` as written before version 2: ItemState v1 (ids as strings), its schema id."""
    rec = dict(codec.serde.decode(codec.encode(task)))
    del rec["recent_event_hashes"]
    rec["recent_event_ids"] = ids
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, rec)
    return frame(load_manifest().records["ItemState"].versions[1].schema_id, buf.getvalue())


# -- the measurements -------------------------------------------------------------------------


def dedupe_add_us(window: int, reps: int) -> dict[str, dict[str, float]]:
    """Median µs per ``add`` of a new id, before/after, interleaved: the first 49 ids of a
    window, and a full window (the ring overwriting its oldest)."""
    out: dict[str, dict[str, list[float]]] = {
        name: {"first_49": [], "full": []} for name in ("before", "after")
    }
    kinds: dict[str, Callable[..., Any]] = {"before": LegacyRecentIds, "after": RecentIds}
    for _ in range(reps):
        for name, cls in kinds.items():
            ids = [f"ml-100k:{j}" for j in range(49 * 400)]
            t0 = time.perf_counter()
            for k in range(400):
                r = cls(window)
                for i in ids[k * 49 : (k + 1) * 49]:
                    r.add(i)
            out[name]["first_49"].append((time.perf_counter() - t0) / len(ids) * 1e6)
            r = cls(window, (f"fill:{j}" for j in range(window)))
            t0 = time.perf_counter()
            for i in ids[:5000]:
                r.add(i)
            out[name]["full"].append((time.perf_counter() - t0) / 5000 * 1e6)
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}


def bytes_per_item(n: int, spec: Spec, codec: ItemStateCodec, recent: int, legacy: bool) -> float:
    """RSS growth per item of holding ``n`` states (run it in a child)."""
    rss, held = held_bytes(lambda: build(n, spec, codec, recent, legacy=legacy))
    return rss / len(held)
