"""Typed views of the Avro records on the wire (one ``TypedDict`` per schema).

Each class mirrors ``schemas/<Name>.avsc`` field by field; :class:`~emerg_stream.io.avro.AvroSerde`
takes one of them and encodes / decodes exactly that record. Conventions:

* Ids (item, user, event) are strings.
* Times (``event_time``, ``produced_time``, ``failed_time``, ``updated_time``) are ``int``
  milliseconds since the Unix epoch, UTC. Encoding also accepts an aware ``datetime``;
  decoding always returns ``int``.
* Feature values travel in three maps keyed by field name, so any dataset fits:
  ``categorical`` (one token), ``multi`` (a list of tokens), ``numeric`` (a float).
* ``adjacency`` / ``id_embedding`` are plain lists of float (Avro ``float``, i.e. float32 on
  the wire: a round trip rounds to float32). Pass ``array.tolist()``, not a numpy array.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

__all__ = [
    "DeadLetter",
    "Interaction",
    "ItemEvent",
    "ItemParams",
    "ItemState",
    "Prediction",
    "SourceOffset",
    "SupportRow",
]


class SourceOffset(TypedDict):
    """A position in a source topic (``emerg_stream.SourceOffset``)."""

    topic: str
    partition: int
    offset: int


class ItemEvent(TypedDict):
    """A new item appears (topic ``items``, key = ``item_id``)."""

    item_id: str
    categorical: dict[str, str]
    multi: dict[str, list[str]]
    numeric: dict[str, float]
    event_time: int


class Interaction(TypedDict):
    """One labelled interaction (topic ``interactions``, key = ``item_id``)."""

    event_id: str
    item_id: str
    user_id: str
    categorical: dict[str, str]
    multi: dict[str, list[str]]
    numeric: dict[str, float]
    label: int
    event_time: int


class ItemParams(TypedDict):
    """Item-specific parameters at one version (topic ``item-params``, compacted)."""

    item_id: str
    version: int
    phase: str
    support_size: int
    model_version: str
    method: str
    n_fields: int
    adjacency: list[float]
    id_embedding: list[float]
    source_offsets: list[SourceOffset]
    produced_time: int


class Prediction(TypedDict):
    """A prequential score of one labelled interaction (topic ``predictions``)."""

    event_id: str
    item_id: str
    user_id: str
    score: float
    label: int
    params_version: int
    phase: str
    event_time: int
    method: str
    shadow: bool


class DeadLetter(TypedDict):
    """A record that failed, with its reason and raw bytes (topic ``dead-letter``)."""

    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None
    error_kind: str
    message: str
    failed_time: int
    truncated: NotRequired[bool]
    value_size: NotRequired[int | None]
    value_sha256: NotRequired[str | None]
    key_size: NotRequired[int | None]


class SupportRow(TypedDict):
    """One interaction kept in an item's support set (inside :class:`ItemState`)."""

    event_id: str
    user_id: str
    categorical: dict[str, str]
    multi: dict[str, list[str]]
    numeric: dict[str, float]
    label: int
    event_time: int


class ItemState(TypedDict):
    """The worker's state of one item (state changelog, compacted; null value = tombstone)."""

    item_id: str
    categorical: dict[str, str]
    multi: dict[str, list[str]]
    numeric: dict[str, float]
    version: int
    phase: str
    support_size: int
    next_threshold: int
    recent_event_ids: list[str]
    recent_event_hashes: bytes
    recent_content_hashes: bytes
    adjacency: list[float]
    id_embedding: list[float]
    n_fields: int
    last_offsets: list[SourceOffset]
    updated_time: int
    shadow_adjacency: list[float]
    shadow_id_embedding: list[float]
    shadow_model_version: str
    support: list[SupportRow]
