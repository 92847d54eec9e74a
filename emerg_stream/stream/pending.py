"""Interactions that wait for their item's announcement, bounded in count and age.

Both topics are consumed together, so an interaction can be read before its item's
``ItemEvent``. It then waits here; when the item is announced its interactions are
applied in offset order. The buffer is bounded:

* **count**: at most ``max_records`` in total (all partitions); beyond it the oldest
  entry is evicted;
* **age**, in *event time*: an entry expires once its partition's *item stream time*
  (the largest event time of the ``ItemEvent`` records read from that partition) is
  more than ``max_age_ms`` past the entry's own event time: the items side has moved on
  and the announcement did not come. Event time, not wall-clock time, so a replay or a
  restart makes the same decisions; and the items topic's clock, not the interactions',
  so a consumer that happens to fetch a backlog of interactions ahead of the items
  (both topics are read at their own pace) does not expire what is merely early. A
  partition whose items topic is quiet expires nothing by age; the count bound still
  holds.

Evicted and expired entries are returned to the caller, which dead-letters them
(``unknown_item``). Pending entries are not counted yet: their outcome comes when they
leave the buffer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from emerg_stream.io.records import Interaction
from emerg_stream.stream.envelope import Inbound

__all__ = ["PendingBuffer", "PendingEntry"]


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """A decoded interaction waiting for its item."""

    msg: Inbound
    record: Interaction


class PendingBuffer:
    """See the module docstring.

    Args:
        max_records: Entries held in total (0: nothing may wait).
        max_age_ms: Event-time age after which an entry expires.

    Raises:
        ValueError: A negative bound.
    """

    def __init__(self, max_records: int, max_age_ms: int) -> None:
        if max_records < 0 or max_age_ms < 0:
            raise ValueError("pending bounds must be non-negative")
        self.max_records = max_records
        self.max_age_ms = max_age_ms
        self._seq = 0
        # arrival order over all partitions: seq -> entry
        self._order: OrderedDict[int, PendingEntry] = OrderedDict()
        # partition -> item id -> seqs in arrival order
        self._by_item: dict[int, dict[str, list[int]]] = {}
        self._count: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._order)

    def add(self, entry: PendingEntry) -> list[PendingEntry]:
        """Hold ``entry``; returns the entries evicted to respect the count bound."""
        if self.max_records == 0:
            return [entry]
        seq = self._seq
        self._seq += 1
        self._order[seq] = entry
        items = self._by_item.setdefault(entry.msg.partition, {})
        items.setdefault(entry.record["item_id"], []).append(seq)
        self._count[entry.msg.partition] = self._count.get(entry.msg.partition, 0) + 1
        evicted = []
        while len(self._order) > self.max_records:
            _, old = self._order.popitem(last=False)
            self._forget(old, None)
            evicted.append(old)
        return evicted

    def count(self, partition: int) -> int:
        """Entries of one partition."""
        return self._count.get(partition, 0)

    def _forget(self, entry: PendingEntry, seq: int | None) -> None:
        self._count[entry.msg.partition] -= 1
        items = self._by_item.get(entry.msg.partition, {})
        seqs = items.get(entry.record["item_id"])
        if not seqs:
            return
        if seq is None:
            seqs.pop(0)  # eviction takes the globally oldest, which is this item's oldest
        else:
            seqs.remove(seq)
        if not seqs:
            del items[entry.record["item_id"]]

    def take(self, partition: int, item_id: str) -> list[PendingEntry]:
        """Remove and return an item's entries, in offset order."""
        seqs = self._by_item.get(partition, {}).pop(item_id, [])
        out = [self._order.pop(s) for s in seqs]
        if out:
            self._count[partition] -= len(out)
        out.sort(key=lambda e: e.msg.offset)
        return out

    def expire(self, partition: int, items_time: int) -> list[PendingEntry]:
        """Remove and return the partition's entries older than the age bound."""
        items = self._by_item.get(partition)
        if not items:
            return []
        limit = items_time - self.max_age_ms
        out: list[PendingEntry] = []
        for item_id in list(items):
            keep = []
            for s in items[item_id]:
                entry = self._order[s]
                if entry.record["event_time"] < limit:
                    del self._order[s]
                    out.append(entry)
                    self._count[partition] -= 1
                else:
                    keep.append(s)
            if keep:
                items[item_id] = keep
            else:
                del items[item_id]
        out.sort(key=lambda e: e.msg.offset)
        return out

    def offsets(self, partition: int) -> list[int]:
        """Source offsets of the partition's entries, ascending."""
        items = self._by_item.get(partition, {})
        return sorted(self._order[s].msg.offset for seqs in items.values() for s in seqs)

    def oldest_time(self, partition: int) -> int | None:
        """Smallest event time among the partition's entries (``None``: none waiting)."""
        items = self._by_item.get(partition, {})
        times = [self._order[s].record["event_time"] for seqs in items.values() for s in seqs]
        return min(times) if times else None

    def drop_partition(self, partition: int) -> int:
        """Forget a revoked partition's entries (they are re-read by its next owner)."""
        items = self._by_item.pop(partition, {})
        self._count.pop(partition, None)
        n = 0
        for seqs in items.values():
            for s in seqs:
                del self._order[s]
                n += 1
        return n
