"""A bounded window of recent event ids, oldest forgotten first (per-item de-duplication).

The window remembers 64-bit hashes of the ids, not the ids: the 8-byte BLAKE2b digest of
the UTF-8 id, read as an unsigned little-endian integer (:func:`event_hash`). They live
in one ``uint64`` numpy ring per item whose capacity doubles up to the window, so an item
costs 8 bytes per remembered id (a Python ``str`` in a ``deque`` and a ``set`` cost ~98)
and its changelog record stores them packed (``ItemState.recent_event_hashes``).
Membership is a vectorised scan of the ring (a window of 1,000 is 8 KB).

**False duplicates.** Two different ids can share a hash; a new id whose hash equals one
of the ``W`` hashes remembered for its item is taken for a duplicate and not applied. For
hashes that behave as uniform 64-bit values the chance is at most ``W / 2**64`` per
interaction (5.4e-17 at the default ``W`` = 1,000), so at most ``N * W / 2**64`` expected
false duplicates over ``N`` interactions (5.4e-5 after 10^12 interactions). The birthday
bound for a collision *among* the ``W`` ids of one window, ``W**2 / 2**65`` (2.7e-14 at
1,000), is smaller still. Duplicates are never missed: equal ids have equal hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = ["HASH_BYTES", "RecentIds", "event_hash"]

#: Bytes per remembered id (in memory and in the changelog).
HASH_BYTES = 8
_LE_U64 = np.dtype("<u8")
_FIRST_CAPACITY = 8

U64Array = npt.NDArray[np.uint64]


def event_hash(event_id: str) -> int:
    """The 64-bit hash the window remembers ``event_id`` by (stable across processes)."""
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=HASH_BYTES).digest()
    return int.from_bytes(digest, "little")


class RecentIds:
    """The last ``window`` distinct event ids seen (as 64-bit hashes), oldest evicted first.

    Args:
        window: How many ids are remembered; the oldest is forgotten beyond it.
        ids: Initial ids, oldest first (duplicates among them count once).

    Raises:
        ValueError: ``window`` is not positive.
    """

    __slots__ = ("_head", "_n", "_ring", "window")

    def __init__(self, window: int, ids: Iterable[str] = ()) -> None:
        if window < 1:
            raise ValueError(f"dedupe window must be positive, got {window}")
        self.window = window
        self._ring: U64Array | None = None  # allocated by the first add
        self._n = 0  # hashes remembered
        self._head = 0  # index of the oldest once the ring is full
        for i in ids:
            self.add(i)

    @classmethod
    def from_hashes(cls, window: int, hashes: U64Array) -> RecentIds:
        """A window holding ``hashes`` (oldest first; only the newest ``window`` kept).

        The hashes are taken as they are (a restored window is already de-duplicated).

        Raises:
            ValueError: ``window`` is not positive.
        """
        out = cls(window)
        kept = np.asarray(hashes, dtype=np.uint64)[-window:]
        if kept.size:
            out._ring = np.empty(_capacity(kept.size, window), dtype=np.uint64)
            out._ring[: kept.size] = kept
            out._n = int(kept.size)
        return out

    @classmethod
    def from_bytes(cls, window: int, data: bytes) -> RecentIds:
        """Inverse of :meth:`to_bytes` (keeps the newest ``window``).

        Raises:
            ValueError: ``window`` is not positive, or ``data`` is not a whole number of
                8-byte hashes.
        """
        if len(data) % HASH_BYTES:
            raise ValueError(f"{len(data)} bytes are not a whole number of 8-byte hashes")
        return cls.from_hashes(window, np.frombuffer(data, dtype=_LE_U64).astype(np.uint64))

    def _live(self) -> U64Array:
        """The remembered hashes in ring order (not oldest first once wrapped)."""
        if self._ring is None:
            return np.empty(0, dtype=np.uint64)
        return self._ring[: self._n]

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; returns False if it was already remembered (a duplicate)."""
        return self.add_hash(event_hash(event_id))

    def add_hash(self, h: int) -> bool:
        """Remember the hash ``h``; returns False if it was already remembered."""
        ring = self._ring
        if ring is not None and self._n and bool((ring[: self._n] == np.uint64(h)).any()):
            return False
        if self._n < self.window:
            if ring is None or self._n == ring.size:
                grown = np.empty(_capacity(self._n + 1, self.window), dtype=np.uint64)
                if ring is not None:
                    grown[: self._n] = ring[: self._n]
                ring = self._ring = grown
            ring[self._n] = h
            self._n += 1
        elif ring is not None:
            ring[self._head] = h  # overwrite the oldest
            self._head = (self._head + 1) % self.window
        return True

    def hashes(self) -> U64Array:
        """The remembered hashes, oldest first (a copy)."""
        live = self._live()
        if self._n < self.window or self._head == 0:
            return live.copy()
        return np.concatenate((live[self._head :], live[: self._head]))

    def to_bytes(self) -> bytes:
        """The hashes, oldest first, packed little-endian (``ItemState.recent_event_hashes``)."""
        return self.hashes().astype(_LE_U64, copy=False).tobytes()

    def __contains__(self, event_id: object) -> bool:
        if not isinstance(event_id, str) or not self._n:
            return False
        return bool((self._live() == np.uint64(event_hash(event_id))).any())

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecentIds):
            return NotImplemented
        return self.window == other.window and np.array_equal(self.hashes(), other.hashes())

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RecentIds(window={self.window}, remembered={self._n})"


def _capacity(n: int, window: int) -> int:
    """Ring size for ``n`` hashes: the next power of two from 8, at most ``window``."""
    cap = _FIRST_CAPACITY
    while cap < n:
        cap *= 2
    return min(cap, window)
