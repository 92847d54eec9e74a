"""The item states a worker holds, grouped by input partition.

Items and interactions are keyed and co-partitioned by item id, so an item lives in the
partition (number) its records arrive on; a revoked partition's items are dropped in one
step and restored in one step from the changelog partition with the same number.

Restored items are **lazy** (:class:`ItemMap`): restore keeps each item's latest raw
changelog value, and the item is decoded the first time it is looked up (a record
touches it, or it is iterated). Items never touched again cost only their raw bytes, and
restore does not wait for decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field

from emerg_stream.state.item import ItemTask

__all__ = ["ItemMap", "Loader", "PartitionItems", "StateStore"]

#: Decodes a raw changelog value of an item: ``(item_id, value) -> state``.
Loader = Callable[[str, bytes], ItemTask]
#: Validates a state decoded from a raw value (raises to refuse it).
Check = Callable[[ItemTask], None]


def _no_loader(item_id: str, value: bytes) -> ItemTask:
    raise KeyError(f"item {item_id!r} is raw but this map has no loader")


class ItemMap(MutableMapping[str, ItemTask]):
    """Item id -> state, where restored items stay raw changelog values until first read.

    Looking an item up (``[]``, ``get``, iterating values) decodes a raw item with
    ``load``, runs the checks (:meth:`add_check`) on it and keeps the decoded state
    instead of the bytes. Membership and length never decode. A decode or check failure
    propagates and leaves the item raw.

    Args:
        items: Decoded states.
        raw: Raw changelog values by item id (must not overlap ``items``).
        load: Decoder of the raw values (required when ``raw`` is not empty).

    Raises:
        ValueError: Raw values without a loader, or an id in both ``items`` and ``raw``.
    """

    __slots__ = ("_checks", "_live", "_load", "_raw")

    def __init__(
        self,
        items: Mapping[str, ItemTask] | None = None,
        *,
        raw: dict[str, bytes] | None = None,
        load: Loader | None = None,
    ) -> None:
        self._live: dict[str, ItemTask] = dict(items or {})
        self._raw: dict[str, bytes] = raw if raw is not None else {}
        if self._raw and load is None:
            raise ValueError("raw item values need a loader")
        both = self._live.keys() & self._raw.keys()
        if both:
            raise ValueError(f"items both decoded and raw: {sorted(both)[:5]}")
        self._load: Loader = _no_loader if load is None else load
        self._checks: list[Check] = []

    def add_check(self, check: Check) -> None:
        """Run ``check`` on every item decoded from now on (the decoded ones are not)."""
        self._checks.append(check)

    @property
    def n_raw(self) -> int:
        """Items not decoded yet."""
        return len(self._raw)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the raw values held (not counting the objects around them)."""
        return sum(len(v) for v in self._raw.values())

    def decoded(self) -> Iterator[ItemTask]:
        """The items decoded so far (no decoding)."""
        return iter(list(self._live.values()))

    def load_all(self) -> int:
        """Decode every raw item; returns how many were decoded."""
        todo = list(self._raw)
        for item_id in todo:
            self[item_id]
        return len(todo)

    def __getitem__(self, item_id: str) -> ItemTask:
        task = self._live.get(item_id)
        if task is not None:
            return task
        value = self._raw[item_id]
        task = self._load(item_id, value)
        for check in self._checks:
            check(task)
        self._live[item_id] = task
        del self._raw[item_id]
        if not self._raw:
            self._raw = {}  # a dict keeps its table when emptied: give it back
        return task

    def get(self, item_id: str, default: ItemTask | None = None) -> ItemTask | None:  # type: ignore[override]
        """The item's state (decoded if raw), or ``default``."""
        if item_id in self._live:
            return self._live[item_id]
        if item_id in self._raw:
            return self[item_id]
        return default

    def __setitem__(self, item_id: str, task: ItemTask) -> None:
        self._raw.pop(item_id, None)
        self._live[item_id] = task

    def __delitem__(self, item_id: str) -> None:
        if self._live.pop(item_id, None) is None:
            del self._raw[item_id]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._live or item_id in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter([*self._live, *self._raw])  # a snapshot: reading decodes (moves) items

    def __len__(self) -> int:
        return len(self._live) + len(self._raw)

    def __repr__(self) -> str:
        return f"ItemMap(decoded={len(self._live)}, raw={len(self._raw)})"


@dataclass
class PartitionItems:
    """The items of one partition and which of them changed since the last checkpoint."""

    items: ItemMap = field(default_factory=ItemMap)
    dirty: set[str] = field(default_factory=set)

    def touch(self, item_id: str) -> None:
        """Mark an item as changed (it goes to the changelog at the next checkpoint)."""
        self.dirty.add(item_id)

    def take_dirty(self) -> list[ItemTask]:
        """The changed items (in id order), forgetting that they changed."""
        out = [self.items[i] for i in sorted(self.dirty) if i in self.items]
        self.dirty.clear()
        return out


class StateStore:
    """Item states of every partition this worker owns."""

    def __init__(self) -> None:
        self._parts: dict[int, PartitionItems] = {}

    def partition(self, p: int) -> PartitionItems:
        """The items of partition ``p``.

        Raises:
            KeyError: The partition is not held.
        """
        return self._parts[p]

    def add_partition(self, p: int, items: Mapping[str, ItemTask] | None = None) -> PartitionItems:
        """Start holding partition ``p`` (e.g. with its restored items).

        An :class:`ItemMap` is adopted as it is (its raw items stay raw); any other
        mapping is copied.
        """
        held = items if isinstance(items, ItemMap) else ItemMap(items)
        part = PartitionItems(items=held)
        self._parts[p] = part
        return part

    def drop_partition(self, p: int) -> int:
        """Forget partition ``p``; returns how many items it held."""
        part = self._parts.pop(p, None)
        return 0 if part is None else len(part.items)

    def get(self, p: int, item_id: str) -> ItemTask | None:
        """The item's state, or None if it is unknown (or the partition is not held)."""
        part = self._parts.get(p)
        return None if part is None else part.items.get(item_id)

    @property
    def partitions(self) -> list[int]:
        """Held partition numbers, ascending."""
        return sorted(self._parts)

    def __contains__(self, p: object) -> bool:
        return p in self._parts

    def __len__(self) -> int:
        """Items held over all partitions (raw or decoded)."""
        return sum(len(part.items) for part in self._parts.values())

    def __iter__(self) -> Iterator[ItemTask]:
        """Every item held (raw ones are decoded)."""
        for part in self._parts.values():
            yield from part.items.values()
