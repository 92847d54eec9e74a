"""Exactly-once processing: one Kafka transaction per batch.

With ``processing_guarantee=exactly_once`` the worker checkpoints every batch through a
:class:`TransactionalCheckpoint` instead of the at-least-once pipeline of
:mod:`emerg_stream.stream.commit`. **Commit order**, per batch, all in one transaction:

1. ``begin_transaction()``;
2. produce the batch's outputs (ItemParams, Predictions, DeadLetters);
3. produce its changelog records (the changed ``ItemState`` records, then each changed
   partition's mark, see :mod:`emerg_stream.stream.checkpointing`);
4. ``send_offsets_to_transaction(input offsets, consumer group metadata)``;
5. ``commit_transaction()``.

Readers with ``isolation.level=read_committed`` (every reader of ours: the worker's
restore, the ranker, evaluate-stream, status, dlq) see a batch's records, and the group
its offsets, only once step 5 succeeded; an aborted or unfinished transaction leaves
nothing visible. So a crash at any step replays the batch without a duplicate
prediction, param or dead letter.

**Fencing.** The producer's ``transactional.id`` is ``<group>.<member>``
(:func:`transactional_id`). The group metadata sent in step 4 carries the consumer's
generation: a member that lost its partitions (e.g. frozen past its session timeout while
another member took over) has step 4 refused and its transaction aborted, so nothing it
produced becomes visible; if it was frozen with a transaction open, the coordinator
aborts that one after ``transaction.timeout.ms`` and fences the producer. A restarted
member with the same member name fences its predecessor at ``init_transactions``.
Failures abort the transaction and raise :class:`~emerg_stream.errors.TransientError`:
the batch's effects are already in the worker's memory, so the job must restart (and
restores the committed state from the changelog).

**Brokers without transactions.** :meth:`TransactionalCheckpoint.check_isolation` writes
one tombstone under a reserved key (:data:`PROBE_KEY`) to the changelog in a transaction,
aborts it and reads it back with ``read_committed``: a broker that shows it (the
embedded Tansu broker accepts transactions but does not isolate them) is refused with
one line. A visible probe is harmless to a restore (a tombstone of a key that is no item).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.stream.envelope import Outbound

__all__ = ["PROBE_KEY", "TransactionalCheckpoint", "default_member_name", "transactional_id"]

log = structlog.get_logger(__name__)

#: Offsets refused because the member's group generation ended (a zombie): fenced.
_GENERATION_CODES = {
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.FENCED_INSTANCE_ID,
}

#: Changelog key of the isolation probe (a tombstone; never a valid item id).
PROBE_KEY = b"\x00emerg:txn-probe"


def default_member_name() -> str:
    """``<hostname>-<pid>``: unique per process (set ``member_name`` for a stable one)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def transactional_id(group_id: str, member_name: str | None) -> str:
    """The ``transactional.id`` of a group member: ``<group>.<member>``."""
    return f"{group_id}.{member_name or default_member_name()}"


class TransactionalCheckpoint:
    """A transactional producer committing each batch atomically (module docstring).

    Args:
        conf: Producer settings (librdkafka keys) without ``transactional.id``.
        txn_id: The ``transactional.id`` (:func:`transactional_id`).
        timeout_ms: ``transaction.timeout.ms``: how long the coordinator lets a
            transaction stay open before aborting it (bounds how long a frozen member's
            open transaction holds back read-committed readers).
        request_timeout_s: Deadline of each transactional call.
    """

    def __init__(
        self,
        conf: Mapping[str, str],
        txn_id: str,
        *,
        timeout_ms: int = 10_000,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.txn_id = txn_id
        self.request_timeout_s = request_timeout_s
        # librdkafka's info chatter (level 6: e.g. "Purging 1 unserved events" when the
        # refusal probe's producer closes) would land on stderr beside the one error line
        full: dict[str, Any] = {"log_level": 4, **conf}
        full.update(
            {
                "transactional.id": txn_id,
                "transaction.timeout.ms": str(timeout_ms),
                "enable.idempotence": "true",
                "acks": "all",
            }
        )
        self.producer = Producer(full)
        self.transactions = 0
        self.aborted = 0

    def start(self) -> None:
        """``init_transactions``: registers the id, fencing an older producer with it.

        Raises:
            ConfigError: Refused by the broker (no permission on the transactional id).
            TransientError: No answer in time.
        """
        try:
            self.producer.init_transactions(self.request_timeout_s)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
                raise ConfigError(
                    f"not allowed to use transactional id {self.txn_id!r} "
                    f"(needs WRITE and DESCRIBE on TransactionalId): {err.str()}"
                ) from exc
            raise TransientError(f"init_transactions({self.txn_id}) failed: {err.str()}") from exc
        log.info("transactions_initialised", transactional_id=self.txn_id)

    def check_isolation(
        self, topic: str, reader_conf: Mapping[str, str], *, timeout_s: float = 10.0
    ) -> None:
        """Refuse a broker that shows aborted records to ``read_committed`` readers.

        Raises:
            ConfigError: The aborted probe record was visible (no transaction isolation).
            TransientError: The probe could not be written or read in time.
        """
        offsets: list[int] = []

        def delivered(err: KafkaError | None, msg: Message) -> None:
            off = msg.offset()
            if err is None and off is not None:
                offsets.append(off)

        p = self.producer
        try:
            p.begin_transaction()
            p.produce(topic, None, PROBE_KEY, 0, on_delivery=delivered)
            p.flush(timeout_s)
            p.abort_transaction(timeout_s)
            p.poll(0)  # serve the probe's events (else librdkafka logs them at exit)
        except KafkaException as exc:
            raise TransientError(f"transaction probe on {topic} failed: {exc}") from exc
        if not offsets:
            raise TransientError(f"transaction probe on {topic}[0] not acknowledged")
        probe = offsets[0]
        consumer = Consumer({**reader_conf, "isolation.level": "read_committed"})
        try:
            consumer.assign([TopicPartition(topic, 0, probe)])
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    off = msg.offset()
                    if off == probe and msg.key() == PROBE_KEY:
                        raise ConfigError(
                            "processing_guarantee=exactly_once needs a broker with transaction "
                            "isolation: this one shows aborted records to read_committed "
                            "readers (the embedded Tansu broker does); use at_least_once"
                        )
                    if off is not None and off > probe:
                        break  # the probe was skipped
                pos = consumer.position([TopicPartition(topic, 0)])[0].offset
                if pos > probe:
                    break  # read past the probe without seeing it
            else:
                raise TransientError(f"transaction probe: {topic}[0] not read past {probe}")
        finally:
            consumer.close()
        log.info("transaction_isolation_checked", topic=topic, probe_offset=probe)

    def commit(
        self,
        outputs: Sequence[Outbound],
        changelog: Sequence[Outbound],
        offsets: Mapping[tuple[str, int], int],
        group_metadata: object,
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """Produce a batch's outputs and changelog and commit them with its offsets.

        Args:
            outputs: ItemParams, Predictions and DeadLetters of the batch.
            changelog: Its changelog records (states, then marks).
            offsets: ``(topic, partition)`` -> next offset to read.
            group_metadata: The group consumer's metadata (generation, member) as it was
                when the batch was polled. A member frozen past its session after the
                poll may have rejoined by now; sent with the poll's generation, its
                offsets are refused and the transaction aborted, where the current
                generation would let a zombie's stale batch commit beside its new owner's.
            before_commit: Called right before ``commit_transaction`` (fault injection).

        Raises:
            TransientError: The transaction failed and was aborted (or the producer was
                fenced); nothing of the batch is visible. Restart from the changelog.
        """
        if not outputs and not changelog and not offsets:
            return
        p = self.producer
        t = self.request_timeout_s
        try:
            p.begin_transaction()
            self._produce(outputs)
            self._produce(changelog)
            if offsets:
                tps = [TopicPartition(tp, part, o) for (tp, part), o in sorted(offsets.items())]
                p.send_offsets_to_transaction(tps, group_metadata, t)
            if before_commit is not None:
                before_commit()
            self._commit_with_retries(t)
        except KafkaException as exc:
            self._abort(exc)
        self.transactions += 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is left (nothing, between batches)."""
        self.producer.flush(timeout_s)

    # -- internals -------------------------------------------------------------------

    def _produce(self, records: Sequence[Outbound]) -> None:
        p = self.producer
        for r in records:
            while True:
                try:
                    if r.partition is None:
                        p.produce(r.topic, r.value, r.key)
                    else:
                        p.produce(r.topic, r.value, r.key, r.partition)
                    break
                except BufferError:
                    p.poll(0.05)

    def _commit_with_retries(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.producer.commit_transaction(max(1.0, deadline - time.monotonic()))
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable() or time.monotonic() >= deadline:
                    raise
                log.warning("transaction_commit_retried", error=err.str())

    def _abort(self, exc: KafkaException) -> None:
        err: KafkaError = exc.args[0]
        self.aborted += 1
        if err.fatal():
            raise TransientError(
                f"transactional producer {self.txn_id!r} fenced or failed fatally "
                f"({err.str()}); another member owns its partitions now"
            ) from exc
        try:
            self.producer.abort_transaction(self.request_timeout_s)
        except KafkaException as abort_exc:
            raise TransientError(
                f"transaction failed ({err.str()}) and its abort too ({abort_exc})"
            ) from exc
        text = err.str()
        if err.code() in _GENERATION_CODES or "Unknown member" in text or "generation" in text:
            raise TransientError(
                f"fenced: the group refused this member's offsets (its generation ended; "
                f"another member owns its partitions now), the transaction was aborted and "
                f"nothing of the batch is visible: {text}"
            ) from exc
        raise TransientError(f"transaction aborted: {text}") from exc
