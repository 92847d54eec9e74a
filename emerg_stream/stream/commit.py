"""The commit pipeline: one object owns the checkpoint order and every commit's result.

**Checkpoint order** (at-least-once delivery, idempotent effects), for every batch ``n``:

1. produce the batch's outputs (ItemParams, Predictions, DeadLetters);
2. once they are acknowledged, produce every changed item's ``ItemState`` and then the
   partition mark to changelog partition ``p`` (explicitly the input partition's number);
3. once those are acknowledged, **commit** the input offsets (the resume points)
   synchronously, checking every partition's result (:func:`commit_offsets`); the
   consumer runs with ``enable.auto.commit=false`` and ``enable.auto.offset.store=false``,
   so nothing is committed before the outputs and the state are durable;
4. write the stats file (if any; the ``on_checkpoint`` callback).

The waits are **pipelined** (:meth:`CommitPipeline.settle`): after processing batch ``n``
the worker waits for what it produced before processing it (batch ``n-1``'s outputs and
``n-2``'s changelog), which the broker acknowledged while ``n`` was processed; it then
commits ``n-2``, produces ``n-1``'s changelog and ``n``'s outputs, and goes on to fetch.
The broker's round trips overlap the model work instead of adding to it. An idle
worker, a revoke and a stop drain the pipeline (:meth:`CommitPipeline.drain`:
everything processed is then durable and committed).

With ``processing_guarantee=exactly_once`` :class:`TransactionalPipeline` replaces it:
one Kafka transaction per batch holds its outputs, its changelog records and its input
offsets (:mod:`emerg_stream.stream.transactions`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from emerg_stream.errors import TransientError
from emerg_stream.stream.checkpointing import PartitionMark
from emerg_stream.stream.envelope import Outbound
from emerg_stream.stream.faults import FaultInjector
from emerg_stream.stream.metrics import WorkerMetrics
from emerg_stream.stream.output import OutputProducer
from emerg_stream.stream.processor_checkpoint import CheckpointRecords
from emerg_stream.stream.transactions import TransactionalCheckpoint

__all__ = ["COMMIT_ATTEMPTS", "CommitPipeline", "TransactionalPipeline", "commit_offsets"]

log = structlog.get_logger(__name__)

#: Attempts of an offset commit whose partitions failed (backoff 200 ms doubling).
COMMIT_ATTEMPTS = 4
#: Commit errors of a member that lost its generation: not fatal, the marks resume it.
_REBALANCE_CODES = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError._ASSIGNMENT_LOST,
}


def commit_offsets(
    consumer: Consumer,
    tps: list[TopicPartition],
    *,
    in_revoke: bool,
    metrics: WorkerMetrics,
    attempts: int = COMMIT_ATTEMPTS,
) -> None:
    """Commit synchronously, check every partition's result, retry what failed.

    A commit that raises is retried whole; one whose result names failed partitions
    is retried for those. After ``attempts`` it raises, unless the member lost its
    generation (a rebalance: the marks just flushed are authoritative and the next
    owner resumes from them) or the commit runs in a revoke.

    Raises:
        TransientError: A partition could not be committed.
    """
    todo, wait = tps, 0.2
    for attempt in range(1, attempts + 1):
        try:
            result = consumer.commit(offsets=todo, asynchronous=False)
        except KafkaException as exc:
            code = exc.args[0].code() if exc.args else None
            if in_revoke or code in _REBALANCE_CODES:
                # The marks just flushed are authoritative; the next owner (this
                # worker after it rejoins, e.g. when the broker froze past the
                # session timeout) restores them from the changelog and resumes there.
                log.warning("commit_failed_in_rebalance", error=str(exc), in_revoke=in_revoke)
                return
            failed_names = [f"{tp.topic}[{tp.partition}]" for tp in todo]
            error = str(exc)
        else:
            failed = [(tp, tp.error) for tp in (result or []) if tp.error is not None]
            if not failed:
                return
            codes = {e.code() for _, e in failed}
            if in_revoke or codes <= _REBALANCE_CODES:
                names = [f"{tp.topic}[{tp.partition}]: {e.str()}" for tp, e in failed]
                log.warning("commit_failed_in_rebalance", partitions=names, in_revoke=in_revoke)
                return
            todo = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp, _ in failed]
            failed_names = [f"{tp.topic}[{tp.partition}]" for tp, _ in failed]
            error = "; ".join(e.str() for _, e in failed)
        metrics.commit_retries.inc(len(todo))
        log.warning(
            "commit_partition_failed", partitions=failed_names, error=error, attempt=attempt
        )
        if attempt == attempts:
            raise TransientError(
                f"offset commit failed for {', '.join(failed_names)} after {attempt} "
                f"attempts: {error}"
            )
        time.sleep(wait)
        wait *= 2


class CommitPipeline:
    """At-least-once: the pipelined checkpoint order of the module docstring.

    Args:
        output: The output producer (produces outputs and changelog records, flushes).
        consumer: Returns the group consumer whose offsets are committed (``None``: closed).
        metrics: Checkpoint durations and commit retries.
        faults: Crash points ``after_changelog`` and ``after_commit``.
        on_checkpoint: Called after every committed checkpoint (the stats file).
    """

    def __init__(
        self,
        output: OutputProducer,
        consumer: Callable[[], Consumer | None],
        *,
        metrics: WorkerMetrics,
        faults: FaultInjector,
        on_checkpoint: Callable[[], None],
    ) -> None:
        self.output = output
        self.consumer = consumer
        self.metrics = metrics
        self.faults = faults
        self.on_checkpoint = on_checkpoint
        #: The last batch's checkpoint: its outputs are produced, not known durable.
        self.held: CheckpointRecords | None = None
        #: The one before: its changelog records are produced, not known durable.
        self.sent: CheckpointRecords | None = None
        #: Partition -> the latest mark known durable.
        self.marks: dict[int, PartitionMark] = {}
        #: Checkpoints committed.
        self.checkpoints = 0

    @property
    def idle(self) -> bool:
        """Nothing produced is waiting to be made durable or committed."""
        return self.held is None and self.sent is None

    def polled(self, consumer: Consumer) -> None:
        """Nothing to note: offsets are committed outside any transaction."""

    def submit(self, outputs: list[Outbound], cp: CheckpointRecords) -> None:
        """A processed batch: settle the earlier stages, produce its outputs, hold ``cp``."""
        self.settle()
        self.output.produce(outputs)
        self.held = cp if cp.records else None

    def settle(self, *, in_revoke: bool = False) -> None:
        """One stage of the pipeline: wait, commit, produce the next changelog.

        Waits until everything produced so far is acknowledged; then the changelog
        produced by the previous stage is durable, so its input offsets are committed,
        and the held checkpoint's outputs are durable, so its changelog records are
        produced (and acknowledged by the next stage). Called after each batch, the wait
        is for records produced one batch earlier: the broker answered them while that
        batch was processed.
        """
        sent, held = self.sent, self.held
        if sent is None and held is None:
            return
        t0 = time.perf_counter()
        self.output.flush()
        if sent is not None:
            self.commit(sent, in_revoke=in_revoke)
            self.sent = None
        if held is not None:
            self.output.produce(held.records)
            self.sent, self.held = held, None
        self.metrics.checkpoint.observe(time.perf_counter() - t0)

    def drain(self, *, in_revoke: bool = False) -> None:
        """Drain the pipeline: everything processed is durable and committed."""
        self.settle(in_revoke=in_revoke)
        self.settle(in_revoke=in_revoke)

    def drop(self) -> None:
        """Partitions lost: what is not yet in the changelog stays out of it."""
        self.held = self.sent = None

    def commit(self, cp: CheckpointRecords, *, in_revoke: bool) -> None:
        """Commit the offsets of a checkpoint whose changelog records are durable."""
        self.faults.hit("after_changelog")
        self.marks.update(cp.marks)
        consumer = self.consumer()
        if cp.offsets and consumer is not None:
            tps = [TopicPartition(t, p, o) for (t, p), o in sorted(cp.offsets.items())]
            commit_offsets(consumer, tps, in_revoke=in_revoke, metrics=self.metrics)
            self.faults.hit("after_commit")
        self.checkpoints += 1
        self.on_checkpoint()


class TransactionalPipeline:
    """``exactly_once``: each batch's outputs, changelog and offsets in one transaction.

    Nothing of a batch is visible to read-committed readers before it commits, so a crash
    or a zombie leaves no duplicate prediction either. Same interface as
    :class:`CommitPipeline`; there is nothing to settle or drain between batches.

    Args:
        txn: The started transactional checkpoint.
        consumer: Returns the group consumer (its group metadata fences zombies).
        metrics: Checkpoint durations.
        faults: Crash points ``after_changelog`` (inside the transaction) and
            ``after_commit``.
        on_checkpoint: Called after every committed transaction that wrote state.
    """

    held: CheckpointRecords | None = None
    sent: CheckpointRecords | None = None
    idle = True

    def __init__(
        self,
        txn: TransactionalCheckpoint,
        consumer: Callable[[], Consumer | None],
        *,
        metrics: WorkerMetrics,
        faults: FaultInjector,
        on_checkpoint: Callable[[], None],
    ) -> None:
        self.txn = txn
        self.consumer = consumer
        self.metrics = metrics
        self.faults = faults
        self.on_checkpoint = on_checkpoint
        self.marks: dict[int, PartitionMark] = {}
        self.checkpoints = 0
        self.group_metadata: object | None = None

    def polled(self, consumer: Consumer) -> None:
        """Note the group generation the batch just polled belongs to (see :meth:`submit`)."""
        self.group_metadata = consumer.consumer_group_metadata()

    def submit(self, outputs: list[Outbound], cp: CheckpointRecords) -> None:
        """The batch's outputs, changelog and offsets in one transaction.

        The offsets go with the group metadata noted when the batch was polled
        (:meth:`polled`), not the current one: a member frozen between poll and commit
        whose session expired has rejoined by the time it resumes, and only the poll's
        generation gets its stale batch refused (the transaction aborts; nothing of the
        batch is visible).
        """
        consumer = self.consumer()
        if consumer is None:
            raise TransientError("the transactional producer or the consumer is closed")
        metadata = self.group_metadata
        if metadata is None:
            metadata = consumer.consumer_group_metadata()
        self.group_metadata = None
        t0 = time.perf_counter()
        self.txn.commit(
            outputs,
            cp.records,
            cp.offsets,
            metadata,
            before_commit=lambda: self.faults.hit("after_changelog"),
        )
        self.faults.hit("after_commit")
        self.marks.update(cp.marks)
        if cp.records:
            self.checkpoints += 1
            self.on_checkpoint()
        self.metrics.checkpoint.observe(time.perf_counter() - t0)

    def settle(self, *, in_revoke: bool = False) -> None:
        """Nothing waits between transactions."""

    def drain(self, *, in_revoke: bool = False) -> None:
        """Nothing waits between transactions."""

    def drop(self) -> None:
        """Nothing is held between transactions."""
