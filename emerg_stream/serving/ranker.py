"""The ranker client: the latest item parameters from the compacted topic, scored locally.

A downstream ranker holds the shared checkpoint (Θ and the feature spec) and needs, per
item, the item-specific φ_i that the worker publishes on the compacted
``item-params`` topic. :class:`RankerClient` reads that topic from the beginning (every
partition, assigned: each ranker replica needs every item, so there is no consumer
group), then keeps following it, either through explicit :meth:`RankerClient.poll` calls
or a background thread (:meth:`RankerClient.start`).

Rules (DESIGN.md §4):

* **Newest version wins.** Per item the highest ``version`` is kept; an older version
  arriving later (a re-delivery, a lagging partition) never overwrites it. A tombstone
  (null value) removes the item.
* **Any method.** φ_i is whatever the checkpoint's method has (EmerG: A_i and e_i^ID;
  DeepFM and MetaE: e_i^ID), read from the record's slots by
  :mod:`emerg_stream.serving.phi`; params of another method are refused.
* **One model version.** Params whose ``model_version`` differs from the checkpoint's are
  refused with a :class:`~emerg_stream.errors.ModelError` naming both versions
  (:meth:`RankerClient.poll` raises after applying the rest of its batch; the background
  thread logs ``params_refused`` and counts them in :attr:`RankerClient.refused`).

Scoring needs, besides φ_i, the item's *side features* (EmerG embeds them and the
hypernetwork reads them). They come from the ``item_features`` argument of
:meth:`RankerClient.score`, else from the ``items`` topic when the client follows it
(``items_topic=``; the replay and the catalogue announce every item there). φ is chosen
per item in this order:

1. the latest published params of the item;
2. an *old* item (one the checkpoint was trained on, ``CheckpointMeta.old_item_ids``): its
   trained parameters (generated graph, ID embedding from the table);
3. an unknown item whose side features are known: **cold start**, φ⁰ from the
   hypernetwork with the checkpoint's noise salt (``CheckpointMeta.noise_salt``) — the very
   params the worker publishes as version 1, so the score does not jump when they arrive;
4. otherwise :class:`UnknownItemError` (a ``ModelError``) naming the items.

Feature dicts are flat, column name -> value, as in the dataset log
(``{"user_id": "7", "gender": "F", "age": "25"}``); :func:`flat_features` turns a
record's ``categorical`` / ``multi`` / ``numeric`` maps into that form.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
from confluent_kafka import Consumer, KafkaError, Message

from emerg_stream.config import KafkaSettings
from emerg_stream.errors import ModelError, SchemaError
from emerg_stream.features import FeatureSpec, encode_records, to_torch
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import ItemEvent, ItemParams
from emerg_stream.meta.checkpoint import Checkpoint, load_checkpoint
from emerg_stream.model.base import Phi, item_noise
from emerg_stream.serving.phi import arrays_to_phi
from emerg_stream.stream.handler import ParamsArrays
from emerg_stream.stream.reader import assign_from_beginning, read_assigned_to_end, reader_conf

__all__ = [
    "RankerClient",
    "UnknownItemError",
    "flat_features",
    "params_to_phi",
]

log = structlog.get_logger(__name__)


class UnknownItemError(ModelError):
    """Items with neither published params, nor trained params, nor known side features."""


def flat_features(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``categorical`` / ``multi`` / ``numeric`` maps as one flat dict.

    Args:
        record: An ``ItemEvent``, ``Interaction`` or any mapping with those maps.

    Returns:
        Column name -> value.
    """
    out: dict[str, Any] = {}
    for key in ("categorical", "multi", "numeric"):
        out.update(record.get(key) or {})
    return out


def params_to_phi(
    records: Sequence[ItemParams], checkpoint: Checkpoint, device: torch.device | str = "cpu"
) -> Phi:
    """Stack published params into φ with a leading item axis ``[I, ...]``.

    Args:
        records: ItemParams of ``I`` items.
        checkpoint: The checkpoint they must belong to.
        device: Where to put the tensors.

    Returns:
        The φ entries of the checkpoint's method (EmerG: ``{"adj": [I, F, F], "id":
        [I, D]}``; DeepFM, MetaE: ``{"id": [I, D]}``).

    Raises:
        ModelError: A record of another model version or method, or of the wrong shape.
    """
    cfg = checkpoint.model.config
    layout = checkpoint.method.layout(cfg.n_fields, cfg.dim)
    for rec in records:
        check_params(rec, checkpoint)
    arrays = ParamsArrays(
        np.asarray(
            [r["adjacency"] for r in records] if layout.adjacency_size else [],
            dtype=np.float32,
        ).reshape(len(records), layout.adjacency_size),
        np.asarray([r["id_embedding"] for r in records], dtype=np.float32).reshape(
            len(records), layout.dim
        ),
    )
    return arrays_to_phi(checkpoint.method, arrays, cfg.n_fields, cfg.dim, device)


def check_params(rec: ItemParams, checkpoint: Checkpoint) -> None:
    """Refuse params of another model version or method, or of a shape the model cannot use.

    Raises:
        ModelError: Naming the item, both model versions (methods), or the bad shape.
    """
    if rec["model_version"] != checkpoint.model_version:
        raise ModelError(
            f"item-params of item {rec['item_id']!r} (version {rec['version']}) belong to model "
            f"version {rec['model_version']!r}, but this checkpoint is model version "
            f"{checkpoint.model_version!r}: refusing them (load the matching checkpoint)"
        )
    method = checkpoint.method.name
    if rec["method"] != method:
        raise ModelError(
            f"item-params of item {rec['item_id']!r} are of method {rec['method']!r}, but this "
            f"checkpoint is {method!r}: refusing them"
        )
    cfg = checkpoint.model.config
    layout = checkpoint.method.layout(cfg.n_fields, cfg.dim)
    if rec["n_fields"] != layout.graph_fields or not layout.fits(
        len(rec["adjacency"]), len(rec["id_embedding"])
    ):
        raise ModelError(
            f"item-params of item {rec['item_id']!r}: n_fields={rec['n_fields']}, "
            f"{len(rec['adjacency'])} adjacency and {len(rec['id_embedding'])} id-embedding "
            f"values do not fit the model (method {method}, F={cfg.n_fields}, d={cfg.dim})"
        )


@dataclass(frozen=True)
class _Held:
    """Params of one item as held by the client (φ without the item axis)."""

    version: int
    phase: str
    phi: Phi


class RankerClient:
    """Latest params per item from the compacted topic + the shared checkpoint -> scores.

    See the module docstring for the rules. Thread-safe: :meth:`score` may run while the
    background thread applies new params.

    Args:
        checkpoint: A loaded :class:`~emerg_stream.meta.checkpoint.Checkpoint` or its
            directory.
        kafka: Cluster settings, or ready librdkafka settings.
        topic: The item-params topic.
        items_topic: Also follow the items topic for item side features (optional).
        device: Torch device of the scoring.

    Example:
        >>> with RankerClient("runs/ck", KafkaSettings(), "emerg.item-params",
        ...                   items_topic="emerg.items") as ranker:     # doctest: +SKIP
        ...     ranker.catch_up()
        ...     ranker.score([{"user_id": "7", "gender": "F"}], ["1682"])
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        kafka: KafkaSettings | Mapping[str, str],
        topic: str,
        *,
        items_topic: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if isinstance(checkpoint, Checkpoint):
            self.checkpoint = checkpoint
        else:
            self.checkpoint = load_checkpoint(checkpoint, device=self.device)
        self.model = self.checkpoint.model.eval()
        self.spec = FeatureSpec.from_dict(self.checkpoint.feature_spec)
        self.model_version = self.checkpoint.model_version
        self.old_items = frozenset(self.checkpoint.meta.old_item_ids)
        self.noise_salt = self.checkpoint.meta.noise_salt
        self.topic = topic
        self.items_topic = items_topic
        conf = kafka.as_librdkafka() if isinstance(kafka, KafkaSettings) else dict(kafka)
        conf.setdefault("group.id", f"emerg-ranker-{uuid.uuid4().hex[:12]}")
        self._consumer_conf = reader_conf(conf)
        self._consumer: Consumer | None = None
        self._listed: dict[tuple[str, int], int] = {}
        self._params_serde = AvroSerde(ItemParams, topic=topic)
        self._items_serde = AvroSerde(ItemEvent, topic=items_topic)
        self._lock = threading.Lock()
        self._params: dict[str, _Held] = {}
        self._features: dict[str, dict[str, Any]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: Params refused for another model version (background thread and poll).
        self.refused = 0
        #: Params ignored because a higher version was already held.
        self.stale = 0
        #: Records that failed to decode (skipped, logged).
        self.undecodable = 0

    # -- state -------------------------------------------------------------------------

    def apply(self, rec: ItemParams) -> bool:
        """Apply one ItemParams record.

        Returns:
            True if it became the item's params; False if a version at least as high is
            already held.

        Raises:
            ModelError: Another model version, or a shape the model cannot use.
        """
        check_params(rec, self.checkpoint)
        item = rec["item_id"]
        with self._lock:
            held = self._params.get(item)
            if held is not None and held.version >= rec["version"]:
                self.stale += 1
                return False
        phi = params_to_phi([rec], self.checkpoint, self.device)
        new = _Held(rec["version"], rec["phase"], {k: v[0] for k, v in phi.items()})
        with self._lock:
            held = self._params.get(item)
            if held is not None and held.version >= rec["version"]:
                self.stale += 1
                return False
            self._params[item] = new
        return True

    def remember_item(self, event: ItemEvent) -> None:
        """Keep an item's side features (from an ItemEvent)."""
        with self._lock:
            self._features[event["item_id"]] = flat_features(event)

    def version(self, item_id: str) -> int | None:
        """The params version held for an item (``None`` if none)."""
        with self._lock:
            held = self._params.get(item_id)
        return None if held is None else held.version

    def phase(self, item_id: str) -> str | None:
        """The phase of the params held for an item (``None`` if none)."""
        with self._lock:
            held = self._params.get(item_id)
        return None if held is None else held.phase

    def __len__(self) -> int:
        with self._lock:
            return len(self._params)

    # -- Kafka -------------------------------------------------------------------------

    def _ensure_consumer(self, timeout_s: float) -> Consumer:
        if self._consumer is None:
            consumer = Consumer(self._consumer_conf)
            topics = [self.topic] + ([self.items_topic] if self.items_topic else [])
            try:
                self._listed = assign_from_beginning(consumer, topics, timeout_s=timeout_s)
            except BaseException:
                consumer.close()
                raise
            self._consumer = consumer
        return self._consumer

    def _handle(self, msg: Message, refusals: list[ModelError]) -> int:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("ranker_consume_error", topic=msg.topic(), error=err.str())
            return 0
        value = msg.value()
        if msg.topic() == self.items_topic:
            if value is None:
                return 0
            try:
                self.remember_item(self._items_serde.decode(value))
            except SchemaError as exc:
                self.undecodable += 1
                log.warning("item_event_undecodable", offset=msg.offset(), error=str(exc))
            return 0
        if value is None:  # tombstone: the item is gone
            key = msg.key()
            if key is not None:
                with self._lock:
                    self._params.pop(key.decode(), None)
            return 0
        try:
            rec = self._params_serde.decode(value)
        except SchemaError as exc:
            self.undecodable += 1
            log.warning("item_params_undecodable", offset=msg.offset(), error=str(exc))
            return 0
        try:
            return int(self.apply(rec))
        except ModelError as exc:
            self.refused += 1
            refusals.append(exc)
            return 0

    def catch_up(self, timeout_s: float = 60.0) -> int:
        """Read the topic(s) from the beginning to their current end (bounded).

        Returns:
            Params applied.

        Raises:
            ModelError: Params of another model version were refused (the others are
                applied; the first refusal is raised).
            TransientError: The end was not reached in time.
        """
        consumer = self._ensure_consumer(timeout_s)
        refusals: list[ModelError] = []
        applied = 0
        for msg in read_assigned_to_end(consumer, self._listed, timeout_s=timeout_s):
            applied += self._handle(msg, refusals)
        self._listed = {}
        log.info("ranker_caught_up", items=len(self), applied=applied, refused=len(refusals))
        if refusals:
            raise refusals[0]
        return applied

    def poll(self, timeout_s: float = 0.0, max_records: int = 10_000) -> int:
        """Apply whatever arrived (waiting up to ``timeout_s`` for the first record).

        Returns:
            Params applied.

        Raises:
            ModelError: Params of another model version were refused (the rest of the
                batch is applied first).
        """
        if self._thread is not None:
            raise ModelError("poll() cannot be used while the background thread runs")
        return self._poll(timeout_s, max_records, raise_refusals=True)

    def _poll(self, timeout_s: float, max_records: int, *, raise_refusals: bool) -> int:
        consumer = self._ensure_consumer(max(timeout_s, 10.0))
        refusals: list[ModelError] = []
        applied = 0
        for msg in consumer.consume(num_messages=max_records, timeout=timeout_s):
            applied += self._handle(msg, refusals)
        if refusals:
            if raise_refusals:
                raise refusals[0]
            log.error("params_refused", count=len(refusals), first=str(refusals[0]))
        return applied

    def start(self) -> None:
        """Follow the topic(s) in a background thread (call :meth:`catch_up` first)."""
        if self._thread is not None:
            return
        self._ensure_consumer(10.0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ranker-params", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll(0.2, 1000, raise_refusals=False)

    def stop(self) -> None:
        """Stop the background thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=10.0)

    def close(self) -> None:
        """Stop following and close the consumer (idempotent)."""
        self.stop()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    def __enter__(self) -> RankerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scoring -----------------------------------------------------------------------

    def score(
        self,
        user_features: Sequence[Mapping[str, Any]],
        item_ids: Sequence[str],
        item_features: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Click probabilities of (user, item) pairs.

        Args:
            user_features: ``[B]`` flat user feature dicts (the user id included), or one
                dict for all items.
            item_ids: ``[B]`` item ids.
            item_features: ``[B]`` flat item side-feature dicts of each row (``None``
                entries: the item's features from the items topic); optional. φ of an item
                without params (cold start, old item) is computed from the items topic's
                features, else from the first row that gives them.

        Returns:
            ``[B]`` float32 scores in (0, 1).

        Raises:
            UnknownItemError: Items without params, training or side features, or items
                whose side features are unknown.
            ValueError: Lengths that do not match.
        """
        b = len(item_ids)
        if len(user_features) not in (1, b):
            raise ValueError(f"{len(user_features)} user feature dicts for {b} items")
        if item_features is not None and len(item_features) != b:
            raise ValueError(f"{len(item_features)} item feature dicts for {b} items")
        if b == 0:
            return np.zeros(0, dtype=np.float32)
        ids = [str(i) for i in item_ids]
        unique = list(dict.fromkeys(ids))
        per_row: list[Mapping[str, Any] | None] = (
            list(item_features) if item_features is not None else [None] * b
        )
        first_given: dict[str, Mapping[str, Any]] = {}
        for i, f in zip(ids, per_row, strict=True):
            if f is not None:
                first_given.setdefault(i, f)
        with self._lock:
            held = {i: self._params[i] for i in unique if i in self._params}
            known = {i: self._features.get(i, first_given.get(i)) for i in unique}
        missing = [i for i in unique if known[i] is None]
        no_phi = [i for i in missing if i not in held and i not in self.old_items]
        if no_phi:
            raise UnknownItemError(
                f"{len(no_phi)} unknown item(s) {no_phi[:5]}: no published params, not in "
                "the training set, and no side features to cold-start them (pass "
                "item_features= or follow the items topic)"
            )
        if missing:
            raise UnknownItemError(
                f"no side features for item(s) {missing[:5]}: EmerG needs them to score; pass "
                "item_features= or follow the items topic (items_topic=)"
            )
        item_id = self.spec.schema.item_id
        item_rows = [{**(known[i] or {}), item_id: i} for i in unique]
        item_t = to_torch(encode_records(self.spec, item_rows, allow_nonfinite=True), self.device)
        phi = self._phi(unique, held, item_t.tokens, item_t.weights)
        users = user_features if len(user_features) == b else [user_features[0]] * b
        pos = {i: j for j, i in enumerate(unique)}
        rows = [
            {**dict(u), **dict(f if f is not None else known[i] or {}), item_id: i}
            for u, i, f in zip(users, ids, per_row, strict=True)
        ]
        enc = to_torch(encode_records(self.spec, rows, allow_nonfinite=True), self.device)
        row_index = torch.tensor([pos[i] for i in ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = self.model(enc.tokens, enc.weights, phi, row_index)
        out: npt.NDArray[np.float32] = torch.sigmoid(logits).cpu().numpy().astype(np.float32)
        return out

    def _phi(
        self,
        unique: list[str],
        held: Mapping[str, _Held],
        tokens: torch.Tensor,
        weights: torch.Tensor,
    ) -> Phi:
        """φ ``[I, ...]`` of the unique items: published, trained (old) or cold start."""
        names = self.model.phi_names
        with torch.no_grad():
            cold = self.model.cold_params(
                tokens,
                weights,
                item_noise(unique, self.model.noise_dim, salt=self.noise_salt).to(self.device),
            )
            old = [j for j, i in enumerate(unique) if i not in held and i in self.old_items]
            if old:
                trained = self.model.trained_params(tokens[old], weights[old])
                for k in names:
                    cold[k][old] = trained[k]
        for j, i in enumerate(unique):
            h = held.get(i)
            if h is None:
                continue
            for k in names:
                cold[k][j] = h.phi[k]
        return {k: cold[k] for k in names}
