"""A bounded window of recent event ids, oldest forgotten first (per-item de-duplication).

The window remembers 64-bit hashes of the ids, not the ids: the 8-byte BLAKE2b digest of
the UTF-8 id (:func:`event_digest`; as a number, the digest read as an unsigned
little-endian integer, :func:`event_hash`). They live back to back in one ``bytearray``
ring per item that grows with the ids up to the window, so an item costs 8 bytes per
remembered id (a Python ``str`` in a ``deque`` and a ``set`` cost ~98), and its
changelog record stores the same bytes (``ItemState.recent_event_hashes``). Membership is
a substring search of the ring in C, accepted only at a multiple of 8 bytes (measured
faster than a numpy comparison of the ring as ``uint64``).

**False duplicates.** Two different ids can share a hash; a new id whose hash equals one
of the ``W`` hashes remembered for its item is taken for a duplicate and not applied. For
hashes that behave as uniform 64-bit values the chance is at most ``W / 2**64`` per
interaction (5.4e-17 at the default ``W`` = 1,000), so at most ``N * W / 2**64`` expected
false duplicates over ``N`` interactions (5.4e-5 after 10^12 interactions). The birthday
bound for a collision *among* the ``W`` ids of one window, ``W**2 / 2**65`` (2.7e-14 at
1,000), is smaller still. Duplicates are never missed: equal ids have equal hashes.

**Conflicts.** Beside each id hash the window keeps a 4-byte digest of the interaction's
content (:func:`content_digest`: user, label, features, event time), so an id that comes
back with *other* content is told apart from a plain re-delivery (:meth:`RecentIds.check`
returns :data:`CONFLICT`). A different content is missed with chance ``2**-32`` (taken
for a duplicate). Windows restored from states written before the digests existed hold
``0`` ("unknown") there, and an unknown content is taken for a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CONFLICT",
    "CONTENT_BYTES",
    "DUPLICATE",
    "HASH_BYTES",
    "NEW",
    "RecentIds",
    "Seen",
    "content_digest",
    "event_digest",
    "event_hash",
]

#: Bytes per remembered id (in memory and in the changelog).
HASH_BYTES = 8
#: Bytes of the content digest kept beside each id hash.
CONTENT_BYTES = 4
_UNKNOWN = bytes(CONTENT_BYTES)
Seen = Literal["new", "duplicate", "conflict"]
NEW: Seen = "new"
DUPLICATE: Seen = "duplicate"
CONFLICT: Seen = "conflict"
_LE_U64 = np.dtype("<u8")

U64Array = npt.NDArray[np.uint64]


def event_digest(event_id: str) -> bytes:
    """The 8 bytes the window remembers ``event_id`` by (stable across processes)."""
    return hashlib.blake2b(event_id.encode("utf-8"), digest_size=HASH_BYTES).digest()


def content_digest(rec: Mapping[str, Any]) -> bytes:
    """4 bytes of BLAKE2b over an interaction's content (never the "unknown" zeros).

    The content is the Python ``repr`` of item id, user id, label, event time and the
    three feature maps as sorted item lists: stable across processes and map orders
    (7.6 µs against 13.4 µs for canonical JSON in one ``timeit`` run of 20,000 calls on
    the shared 2-core machine; it runs once per interaction).
    """
    key = (
        rec["item_id"],
        rec["user_id"],
        rec["label"],
        rec["event_time"],
        sorted(rec["categorical"].items()),
        sorted((k, list(v)) for k, v in rec["multi"].items()),
        sorted(rec["numeric"].items()),
    )
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=CONTENT_BYTES).digest()
    return digest if digest != _UNKNOWN else b"\x00\x00\x00\x01"


def event_hash(event_id: str) -> int:
    """:func:`event_digest` as an unsigned 64-bit integer (little-endian)."""
    return int.from_bytes(event_digest(event_id), "little")


class RecentIds:
    """The last ``window`` distinct event ids seen (as 64-bit hashes), oldest evicted first.

    Args:
        window: How many ids are remembered; the oldest is forgotten beyond it.
        ids: Initial ids, oldest first (duplicates among them count once).

    Raises:
        ValueError: ``window`` is not positive.
    """

    __slots__ = ("_content", "_head", "_ring", "window")

    def __init__(self, window: int, ids: Iterable[str] = ()) -> None:
        if window < 1:
            raise ValueError(f"dedupe window must be positive, got {window}")
        self.window = window
        # the digests back to back; once it holds ``window`` of them it is a ring whose
        # oldest digest starts at byte ``_head``
        self._ring = bytearray()
        self._content = bytearray()  # CONTENT_BYTES per id, same slots as ``_ring``
        self._head = 0
        for i in ids:
            self.add(i)

    @classmethod
    def from_bytes(cls, window: int, data: bytes, content: bytes = b"") -> RecentIds:
        """Inverse of :meth:`to_bytes` (and :meth:`content_bytes`), the newest ``window``.

        The hashes are taken as they are (a stored window is already de-duplicated).
        Content digests that do not match the hashes in number (a state written before
        they existed) are taken as unknown.

        Raises:
            ValueError: ``window`` is not positive, or ``data`` is not a whole number of
                8-byte hashes.
        """
        if len(data) % HASH_BYTES:
            raise ValueError(f"{len(data)} bytes are not a whole number of 8-byte hashes")
        out = cls(window)
        out._ring = bytearray(data[-window * HASH_BYTES :])
        n = len(out._ring) // HASH_BYTES
        if len(content) == (len(data) // HASH_BYTES) * CONTENT_BYTES:
            out._content = bytearray(content[len(content) - n * CONTENT_BYTES :])
        else:
            out._content = bytearray(n * CONTENT_BYTES)
        return out

    def _find(self, digest: bytes) -> int:
        """Slot of ``digest`` in the ring, or -1."""
        ring = self._ring
        at = ring.find(digest)
        while at >= 0:
            if at % HASH_BYTES == 0:
                return at // HASH_BYTES
            at = ring.find(digest, at + 1)  # a match across two hashes: look further
        return -1

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; returns False if it was already remembered (a duplicate)."""
        return self.check(event_id, _UNKNOWN) == NEW

    def check(self, event_id: str, content: bytes) -> Seen:
        """Remember ``event_id`` with its content digest (:func:`content_digest`).

        Returns:
            ``new`` (now remembered), ``duplicate`` (seen with the same or an unknown
            content) or ``conflict`` (seen with another content; the first stays).
        """
        digest = event_digest(event_id)
        slot = self._find(digest)
        if slot >= 0:
            seen = bytes(self._content[slot * CONTENT_BYTES : (slot + 1) * CONTENT_BYTES])
            if _UNKNOWN in (seen, content) or seen == content:
                return DUPLICATE
            return CONFLICT
        ring = self._ring
        if len(ring) < self.window * HASH_BYTES:
            ring += digest
            self._content += content
        else:  # full: overwrite the oldest
            head = self._head
            ring[head : head + HASH_BYTES] = digest
            c = head // HASH_BYTES * CONTENT_BYTES
            self._content[c : c + CONTENT_BYTES] = content
            self._head = (head + HASH_BYTES) % len(ring)
        return NEW

    def to_bytes(self) -> bytes:
        """The hashes, oldest first, 8 bytes each (``ItemState.recent_event_hashes``)."""
        head, ring = self._head, self._ring
        return bytes(ring[head:] + ring[:head]) if head else bytes(ring)

    def content_bytes(self) -> bytes:
        """The content digests in the order of :meth:`to_bytes`, 4 bytes each (0 = unknown)."""
        c, content = self._head // HASH_BYTES * CONTENT_BYTES, self._content
        return bytes(content[c:] + content[:c]) if c else bytes(content)

    def hashes(self) -> U64Array:
        """The remembered hashes as integers, oldest first."""
        return np.frombuffer(self.to_bytes(), dtype=_LE_U64).astype(np.uint64)

    def __contains__(self, event_id: object) -> bool:
        return isinstance(event_id, str) and self._find(event_digest(event_id)) >= 0

    def __len__(self) -> int:
        return len(self._ring) // HASH_BYTES

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecentIds):
            return NotImplemented
        return (
            self.window == other.window
            and self.to_bytes() == other.to_bytes()
            and self.content_bytes() == other.content_bytes()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RecentIds(window={self.window}, remembered={len(self)})"
