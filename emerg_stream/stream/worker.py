"""The warm-up worker: one consumer-group member turning items + clicks into params.

Per micro-batch (what has been fetched, up to ``batch_max_records``; see
:meth:`Worker._next_batch`) the
:class:`~emerg_stream.stream.processor.WarmupProcessor` decodes, cold-starts new items,
scores and applies interactions in prequential rounds and runs the batched warm-up
updates, and takes the batch's checkpoint (changed item states, partition marks, input
offsets). **Checkpoint order** (at-least-once delivery, idempotent effects), for every
batch ``n``:

1. produce the batch's outputs (ItemParams, Predictions, DeadLetters);
2. once they are acknowledged, produce every changed item's ``ItemState`` and then the
   partition mark to changelog partition ``p`` (explicitly the input partition's number);
3. once those are acknowledged, **commit** the input offsets (the resume points)
   synchronously; the consumer runs with ``enable.auto.commit=false`` and
   ``enable.auto.offset.store=false``, so nothing is committed before the outputs and the
   state are durable;
4. write the stats file (if any).

The waits are **pipelined** (:meth:`Worker._settle`): after processing batch ``n`` the
worker waits for what it produced before processing it (batch ``n-1``'s outputs and
``n-2``'s changelog), which the broker acknowledged while ``n`` was processed; it then
commits ``n-2``, produces ``n-1``'s changelog and ``n``'s outputs, and goes on to fetch.
The broker's round trips overlap the model work instead of adding to it. An idle
worker, a revoke and a stop drain the pipeline (everything processed is then durable
and committed).

A crash before a batch's changelog is acknowledged replays the records since the
previous mark: params versions are recomputed identically (φ depends only on the item's
records) and re-published under the same version; predictions and dead letters may
appear twice. A crash between steps 2 and 3 resumes from the mark, which is
authoritative, so nothing is applied or counted twice (see
:mod:`emerg_stream.stream.checkpointing`).

With ``processing_guarantee=exactly_once`` the pipeline above is replaced by one Kafka
transaction per batch holding its outputs, its changelog records and its input offsets
(:mod:`emerg_stream.stream.transactions`, :meth:`Worker._commit_transaction`): nothing of
a batch is visible to read-committed readers before it commits, so a crash or a zombie
leaves no duplicate prediction either.

Rebalances use the eager ``range`` assignor: it gives a member the same partition
numbers of the two co-partitioned topics (cooperative-sticky does not promise that, and
on Tansu it took ~11 s per rebalance against ~4 s for eager). On revoke the worker
checkpoints and drops the partitions' state; on assign it restores them from the
changelog (a separate assigned consumer) before any record is processed, and seeks to
the marks. Interactions that run ahead of their items' announcements are throttled by pausing
their partition (:mod:`emerg_stream.stream.flow`), so a backlog does not overflow the
pending buffer. ``stop()`` (SIGTERM/SIGINT in the job) ends the loop after the current batch,
checkpoints and closes. Bad records never stop the loop (dead letters); broker, flush
and commit failures propagate so the orchestrator restarts the job.

**Hostile input and Kafka's limits** (docs/RELIABILITY.md): at start the worker reads the
changelog's and dead-letter topic's record size limits and refuses input bounds whose
largest item state would not fit (:mod:`emerg_stream.stream.limits`). An output record
refused for good (``MSG_SIZE_TOO_LARGE`` and the like, at ``produce`` or on delivery) is
logged and counted (``emerg_worker_outputs_refused_total``), a refused dead letter is
re-sent without its raw bytes, and the loop goes on; only an item state that cannot be
written stops the worker (the changelog must hold what the marks claim). A transient
``produce`` error is retried with backoff. Offset commits are checked partition by
partition and a failed partition is retried. **Poison-pill guard**: when processing a
batch raises an unexpected exception (a bug a record finds; not an ``EmergError`` such as a
broker failure or a restored state of another model, nor a ``KafkaException``), the worker
writes a :class:`~emerg_stream.stream.checkpointing.SuspectNote` with the batch's offsets to the
changelog before it exits; the next owner of the partition dead-letters those records
(``poison_pill``), so no record makes the worker exit non-zero twice at the same offset.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from emerg_stream.config import WorkerSettings
from emerg_stream.errors import ConfigError, EmergError, SchemaError, TransientError
from emerg_stream.io.records import DeadLetter
from emerg_stream.stream.changelog import restore_partitions
from emerg_stream.stream.checkpointing import SUSPECT_KEY, PartitionMark, SuspectNote
from emerg_stream.stream.connect import wait_for_brokers
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.faults import FaultInjector
from emerg_stream.stream.flow import Backpressure
from emerg_stream.stream.handler import WarmupHandler
from emerg_stream.stream.lag import assigned_lag
from emerg_stream.stream.limits import check_state_fits, read_output_limits
from emerg_stream.stream.metrics import OutcomeCounts, WorkerMetrics
from emerg_stream.stream.processor import BatchSummary, CheckpointRecords, WarmupProcessor
from emerg_stream.stream.replay import reader_conf
from emerg_stream.stream.topics import check_access, check_copartitioned, topic_partitions
from emerg_stream.stream.transactions import TransactionalCheckpoint, transactional_id
from emerg_stream.topic_roles import INPUT_ROLES, read_roles, written_roles

__all__ = ["Worker", "consumer_conf", "producer_conf"]

log = structlog.get_logger(__name__)

_FLUSH_TIMEOUT_S = 30.0
_RESTORE_TIMEOUT_S = 120.0
#: A transient ``produce`` error is retried this long (backoff 50 ms doubling to 2 s).
_PRODUCE_RETRY_S = 30.0
#: Attempts of an offset commit whose partitions failed (backoff 200 ms doubling).
_COMMIT_ATTEMPTS = 4
#: Delivery errors that belong to one record (it can never be written), not to the broker.
_RECORD_ERRORS = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_MSG,
}
#: Commit errors of a member that lost its generation: not fatal, the marks resume it.
_REBALANCE_CODES = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError._ASSIGNMENT_LOST,
}


def consumer_conf(settings: WorkerSettings) -> dict[str, str]:
    """Settings (librdkafka keys) of the group consumer.

    Raises:
        ConfigError: ``extra`` asks for another assignor than ``range``.
    """
    conf = settings.kafka.as_librdkafka()
    strategy = conf.get("partition.assignment.strategy", "range")
    if strategy != "range":
        raise ConfigError(
            f"partition.assignment.strategy={strategy!r}: the worker needs the eager 'range' "
            f"assignor (same partition numbers of items and interactions on one member)"
        )
    conf.update(
        {
            "group.id": settings.group_id,
            "partition.assignment.strategy": "range",
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": str(settings.session_timeout_ms),
            "heartbeat.interval.ms": str(settings.heartbeat_interval_ms),
            # librdkafka's default, explicit: records of open or aborted transactions
            # (exactly_once) are never processed
            "isolation.level": "read_committed",
        }
    )
    # Shorter than librdkafka's 500 ms: a fetch waiting that long showed up in the
    # produce -> params latency (benchmarks/latency.py on Tansu, 1,800 events/s: p50
    # 0.47 -> 0.38 s, p99 0.9-1.5 -> 0.8-0.9 s; docs/BENCHMARKS_STREAM.md). ``extra`` may
    # set it.
    conf.setdefault("fetch.wait.max.ms", "50")
    return conf


def producer_conf(settings: WorkerSettings) -> dict[str, str]:
    """Settings (librdkafka keys) of the idempotent output producer."""
    conf = settings.kafka.as_librdkafka()
    for key in ("partition.assignment.strategy",):
        conf.pop(key, None)
    conf.setdefault("linger.ms", "2")
    conf.update({"enable.idempotence": "true", "acks": "all"})
    return conf


class Worker:
    """One member of the worker group (see the module docstring).

    Args:
        settings: Worker settings (cluster, topics, group, batch and buffer sizes).
        handler: The model side (``emerg_stream.serving.handler.TorchWarmupHandler``).
        stats_path: JSON file rewritten after every checkpoint (counters, partitions).
        metrics: Prometheus metrics (default: a fresh registry; served if
            ``settings.metrics_port`` is set).
        exit_when_idle_s: Stop by itself after this long without a record, counted from
            the first partition assignment on (``None``: run until :meth:`stop`).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        handler: WarmupHandler,
        *,
        stats_path: Path | None = None,
        metrics: WorkerMetrics | None = None,
        exit_when_idle_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.topics = settings.topics
        self.stats_path = stats_path
        self.metrics = metrics or WorkerMetrics()
        self.exit_when_idle_s = exit_when_idle_s
        self.processor = WarmupProcessor(
            handler,
            settings.topics,
            dedupe_window=settings.dedupe_window,
            pending_max=settings.pending_max,
            pending_max_age_ms=settings.pending_max_age_ms,
            metrics=self.metrics,
            auc_window=settings.auc_window,
            inputs=settings.inputs,
        )
        #: Crash points for the fault-injection tests (``EMERG_FAULT_INJECT``; off if unset).
        self.faults = FaultInjector.from_env()
        self.processor.on_update = lambda: self.faults.hit("mid_update")
        self._stop = threading.Event()
        self._failed = False
        self._delivery_error: KafkaError | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._restorer: Consumer | None = None
        #: The transactional checkpoint (``exactly_once`` only).
        self._txn: TransactionalCheckpoint | None = None
        self._last_activity = time.monotonic()
        self._marks: dict[int, PartitionMark] = {}
        # The checkpoint pipeline (see _settle): the last batch's checkpoint, whose
        # outputs are produced but not known durable, and the one before it, whose
        # changelog records are produced but not known durable.
        self._held: CheckpointRecords | None = None
        self._sent: CheckpointRecords | None = None
        self.flow = Backpressure(settings.pending_max)
        self.pauses = 0
        self.batches = 0
        self.checkpoints = 0
        self.rebalances = 0
        self._epoch = 0  # bumped by every rebalance callback (see _next_batch)
        self.restored_items = 0
        #: Port of the metrics server once serving (``metrics_port=0`` picks a free one).
        self.metrics_port: int | None = None

    # -- public ----------------------------------------------------------------------

    @property
    def counts(self) -> OutcomeCounts:
        """Outcomes counted by this process since it started."""
        return self.processor.counts

    def stop(self) -> None:
        """Ask the loop to finish the current batch, checkpoint and close (thread-safe)."""
        self._stop.set()

    def run(self) -> None:
        """Check the topics, join the group and process until stopped.

        Raises:
            ConfigError: Topics missing or not co-partitioned, or a bad assignor setting.
            TransientError: Broker, flush or commit failures (restart the job).
            ModelError: Restored state of another model version.
        """
        with structlog.contextvars.bound_contextvars(
            job="worker",
            consumer_group=self.settings.group_id,
            model_version=self.handler.model_version,
        ):
            self._run()

    # -- loop ------------------------------------------------------------------------

    def _run(self) -> None:
        n = self._preflight()
        base = self.settings.kafka.as_librdkafka()
        base.pop("partition.assignment.strategy", None)
        if self.settings.processing_guarantee == "exactly_once":
            self._txn = self._start_transactions(base)
            self._producer = self._txn.producer
        else:
            self._producer = Producer(producer_conf(self.settings))
        # A short fetch wait: the restorer is reused, and a restore reads to the end of
        # the changelog; with librdkafka's 500 ms the broker held the previous restore's
        # last fetch and every later restore started ~0.5 s late (6-12 ms with 10).
        self._restorer = Consumer({**reader_conf(base), "fetch.wait.max.ms": "10"})
        self._consumer = Consumer(consumer_conf(self.settings))
        if self.settings.metrics_port is not None:
            host = self.settings.metrics_host
            self.metrics_port = self.metrics.serve(self.settings.metrics_port, host)
            log.info("metrics_serving", url=f"http://{host}:{self.metrics_port}/metrics")
        self._consumer.subscribe(
            [self.topics.name(role) for role in INPUT_ROLES],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("worker_started", partitions=n, pid=os.getpid())
        try:
            while not self._stop.is_set():
                batch = self._inbound(self._next_batch(self._consumer))
                if batch:
                    self._last_activity = time.monotonic()
                    self._handle(batch)
                elif self._idle():
                    log.info("worker_idle_exit", idle_s=self.exit_when_idle_s)
                    break
                self._flow_control(batch)
                self.metrics.set_lag(assigned_lag(self._consumer))
                self.metrics.set_held(self.topics.interactions, self.processor.held())
            self._checkpoint()
        except BaseException:
            self._failed = True
            raise
        finally:
            self._close()

    def _preflight(self) -> int:
        conf: dict[str, str | int | float | bool] = dict(self.settings.kafka.as_librdkafka())
        outputs = [self.topics.name(role) for role in written_roles()]
        wait_for_brokers(self.settings)
        refused: str | None = None
        admin = AdminClient(conf)
        try:
            n = check_copartitioned(admin, self.topics.items, self.topics.interactions)
            counts = topic_partitions(admin, outputs)
            who = self.settings.kafka.sasl_username
            check_access(
                admin,
                [self.topics.name(role) for role in read_roles()],
                outputs,
                who=f"user {who!r}" if who else "this client",
            )
        except ConfigError as exc:
            refused = str(exc)  # re-raised below, without a traceback holding the client
        del admin
        if refused is not None:
            raise ConfigError(refused)
        missing = [t for t in outputs if t not in counts]
        if missing:
            raise ConfigError(
                f"topic(s) {', '.join(missing)} do not exist; create them with "
                f"`emerg-stream topics create`"
            )
        if counts[self.topics.changelog] < n:
            raise ConfigError(
                f"changelog {self.topics.changelog!r} has {counts[self.topics.changelog]} "
                f"partitions, fewer than the {n} input partitions it mirrors"
            )
        admin = AdminClient(conf)
        try:
            limits = read_output_limits(
                admin, self.topics.changelog, self.topics.dead_letter, producer_conf(self.settings)
            )
        finally:
            del admin
        bound = check_state_fits(
            self.settings.inputs,
            limits,
            k=self.handler.k,
            dedupe_window=self.settings.dedupe_window,
            n_fields=self.handler.n_fields,
            dim=self.handler.dim,
        )
        self.processor.use_limits(limits)
        log.info(
            "record_limits",
            changelog=limits.changelog,
            dead_letter=limits.dead_letter,
            sources=dict(limits.sources or {}),
            state_bound=bound,
        )
        return n

    def _flow_control(self, batch: list[Inbound]) -> None:
        """Pause interactions partitions that run ahead of their items (see ``flow``)."""
        consumer = self._consumer
        if consumer is None:
            return
        now = time.monotonic()
        self.flow.items_delivered({m.partition for m in batch if m.topic == self.topics.items}, now)
        pending = self.processor.pending
        waiting = {p: pending.count(p) for p in self.processor.partitions}
        pause, resume = self.flow.decide(waiting, now)
        if pause:
            consumer.pause([TopicPartition(self.topics.interactions, p) for p in pause])
            self.pauses += len(pause)
            log.info("interactions_paused", partitions=pause, waiting=sum(waiting.values()))
        if resume:
            consumer.resume([TopicPartition(self.topics.interactions, p) for p in resume])
            log.info("interactions_resumed", partitions=resume, waiting=sum(waiting.values()))

    def _idle(self) -> bool:
        """Idle long enough to exit (counted from the first assignment on)."""
        if self.exit_when_idle_s is None or not self.rebalances:
            return False
        return time.monotonic() - self._last_activity > self.exit_when_idle_s

    def _next_batch(self, consumer: Consumer) -> list[Message]:
        """The next micro-batch: records already fetched, else wait for the first.

        Natural batching: a batch is what arrived while the previous one was processed
        (up to ``batch_max_records``), taken without waiting, so a record waits for at
        most one batch, never for a batch to fill. Only when nothing is fetched does the
        worker block (up to ``batch_timeout_ms``) for one record and then linger
        ``batch_linger_ms`` for company, so a trickle is not processed one record at a
        time. Rebalance callbacks run inside these calls: if one runs during the linger,
        the record read before it may be of a revoked partition, so it is left unread
        (nothing was committed past it; its partition's owner reads it again). Before
        blocking, the checkpoint pipeline is drained (:meth:`_checkpoint`), so an idle
        worker has everything committed.
        """
        most = self.settings.batch_max_records
        msgs = consumer.consume(most, timeout=0)
        if msgs:
            return msgs
        self._checkpoint()  # nothing to overlap with: drain the pipeline before waiting
        msgs = consumer.consume(1, timeout=self.settings.batch_timeout_ms / 1000)
        linger = self.settings.batch_linger_ms / 1000
        if msgs and most > 1 and linger > 0:
            epoch = self._epoch
            more = consumer.consume(most - 1, timeout=linger)
            msgs = msgs + more if epoch == self._epoch else more
        return msgs

    def _inbound(self, msgs: Sequence[Message]) -> list[Inbound]:
        batch = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise TransientError(f"fatal consumer error: {err.str()}")
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer_error", error=err.str(), code=err.code())
                continue
            topic, p, off = m.topic(), m.partition(), m.offset()
            if topic is None or p is None or off is None:
                continue
            batch.append(Inbound(topic, p, off, m.key(), m.value()))
        return batch

    def _handle(self, batch: list[Inbound]) -> None:
        t0 = time.perf_counter()
        try:
            outputs, summary = self.processor.process(batch)
        except (EmergError, KafkaException):
            # the cluster, the set-up or the restored state (another model's, corrupt),
            # not a record: restart as it is, nothing is dead-lettered for it
            raise
        except Exception as exc:
            self._suspect(batch, exc)
            raise
        cp = self.processor.checkpoint()
        t1 = time.perf_counter()
        if self._txn is not None:
            self._commit_transaction(outputs, cp)
        else:
            self._settle()
            self._produce(outputs)
            self._held = cp if cp.records else None
        self.batches += 1
        self._log_batch(batch, summary, t0, t1, cp.items)

    def _log_batch(
        self, batch: list[Inbound], summary: BatchSummary, t0: float, t1: float, cp_items: int
    ) -> None:
        log.info(
            "batch_processed",
            records=summary.records,
            skipped=summary.skipped,
            first_offset=min(m.offset for m in batch),
            partitions=sorted({m.partition for m in batch}),
            new_items=summary.new_items,
            items=summary.counts.items,
            interactions=summary.counts.interactions,
            pending=summary.pending,
            rounds=summary.rounds,
            updated_items=summary.updated_items,
            params=summary.params,
            predictions=summary.predictions,
            update_ms=round(summary.update_s * 1000, 1),
            process_ms=round((t1 - t0) * 1000, 1),
            settle_ms=round((time.perf_counter() - t1) * 1000, 1),
            states_written=cp_items,
        )

    # -- producing and checkpointing -------------------------------------------------

    def _suspect(self, batch: list[Inbound], exc: BaseException) -> None:
        """The poison-pill guard: note the batch's offsets in the changelog, then exit.

        Best effort (the process is going down): the note goes through a producer of its
        own (plain, idempotent; the worker's may be transactional or broken by then),
        flushed for up to 10 s, and a failure to write it is logged, not raised over the
        original error.
        """
        error = f"{type(exc).__name__}: {exc}"[:500]
        by_partition: dict[int, dict[str, set[int]]] = {}
        roles = {self.topics.name(role): role for role in INPUT_ROLES}
        for m in batch:
            role = roles.get(m.topic)
            if role is not None:
                by_partition.setdefault(m.partition, {}).setdefault(role, set()).add(m.offset)
        log.error("poison_suspected", error=error, partitions=sorted(by_partition))
        try:
            producer = Producer(producer_conf(self.settings))
            for p, offsets in sorted(by_partition.items()):
                note = SuspectNote(p, {r: frozenset(o) for r, o in offsets.items()}, error)
                note = note.merged(self.processor.suspects.get(p))
                producer.produce(self.topics.changelog, note.encode(), SUSPECT_KEY, p)
            left = producer.flush(10.0)
            if left:
                log.error("poison_note_not_written", undelivered=left)
        except (KafkaException, BufferError) as err:
            log.error("poison_note_not_written", error=str(err))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            return
        topic = msg.topic() or ""
        if err.code() in _RECORD_ERRORS and topic != self.topics.changelog:
            self._refused(topic, msg.value(), err)  # that record only: the loop goes on
            return
        if self._delivery_error is None:
            self._delivery_error = err

    def _refused(self, topic: str, value: bytes | None, err: KafkaError) -> None:
        """An output record refused for good: logged and counted; a dead letter re-sent bare."""
        self.metrics.outputs_refused.labels(topic=topic, error=err.name()).inc()
        log.error(
            "output_refused", topic=topic, bytes=len(value or b""), error=err.str(), code=err.name()
        )
        if topic != self.topics.dead_letter or value is None or self._producer is None:
            return
        serde = self.processor.dead.serde
        try:
            d = serde.decode(value)
        except SchemaError as exc:  # logged; the dead letter is then lost
            log.error("dead_letter_not_resent", error=str(exc))
            return
        if d.get("truncated") and d["value"] is None:
            return  # already bare: nothing smaller to send
        bare: DeadLetter = {
            **d,
            "key": None,
            "value": None,
            "truncated": True,
            "message": (f"raw bytes left out: {err.name()}; " + d["message"])[:2000],
        }
        try:
            self._producer.produce(topic, serde.encode(bare), on_delivery=self._on_delivery)
        except (KafkaException, BufferError) as exc:  # logged; the dead letter is then lost
            log.error("dead_letter_not_resent", error=str(exc))

    def _produce(self, records: list[Outbound]) -> None:
        """Produce ``records`` in order (see the module docstring for the error policy).

        Raises:
            TransientError: The producer is closed, a transient error outlasted
                ``_PRODUCE_RETRY_S``, or an item state was refused.
        """
        producer = self._producer
        if producer is None:
            raise TransientError("the producer is closed")
        for r in records:
            wait, deadline = 0.05, time.monotonic() + _PRODUCE_RETRY_S
            while True:
                try:
                    if r.partition is None:
                        producer.produce(r.topic, r.value, r.key, on_delivery=self._on_delivery)
                    else:
                        producer.produce(
                            r.topic, r.value, r.key, r.partition, on_delivery=self._on_delivery
                        )
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: let deliveries drain
                except KafkaException as exc:
                    err: KafkaError = exc.args[0]
                    if err.fatal():
                        raise TransientError(f"fatal producer error: {err.str()}") from exc
                    if err.retriable() or err.code() == KafkaError._QUEUE_FULL:
                        if time.monotonic() > deadline:
                            raise TransientError(f"produce kept failing: {err.str()}") from exc
                        log.warning("produce_retried", topic=r.topic, error=err.str(), wait_s=wait)
                        producer.poll(wait)
                        wait = min(2.0, wait * 2)
                        continue
                    if r.topic == self.topics.changelog:
                        raise TransientError(
                            f"an item state was refused ({err.str()}, {len(r.value or b''):,} "
                            f"bytes): the changelog must hold what the marks claim"
                        ) from exc
                    self._refused(r.topic, r.value, err)
                    break

    def _flush(self) -> None:
        producer = self._producer
        if producer is None:
            return
        left = producer.flush(_FLUSH_TIMEOUT_S)
        if left:
            raise TransientError(f"{left} records not delivered within {_FLUSH_TIMEOUT_S}s")
        if self._delivery_error is not None:
            err, self._delivery_error = self._delivery_error, None
            raise TransientError(f"delivery failed: {err.str()}")

    def _settle(self, *, in_revoke: bool = False) -> None:
        """One stage of the checkpoint pipeline: wait, commit, produce the next changelog.

        Waits until everything produced so far is acknowledged; then the changelog
        produced by the previous stage is durable, so its input offsets are committed,
        and the held checkpoint's outputs are durable, so its changelog records are
        produced (and acknowledged by the next stage). Called after each batch, the wait
        is for records produced one batch earlier: the broker answered them while that
        batch was processed.
        """
        sent, held = self._sent, self._held
        if sent is None and held is None:
            return
        t0 = time.perf_counter()
        self._flush()
        if sent is not None:
            self._commit(sent, in_revoke=in_revoke)
            self._sent = None
        if held is not None:
            self._produce(held.records)
            self._sent, self._held = held, None
        self.metrics.checkpoint.observe(time.perf_counter() - t0)

    def _commit(self, cp: CheckpointRecords, *, in_revoke: bool) -> None:
        """Commit the offsets of a checkpoint whose changelog records are durable."""
        self.faults.hit("after_changelog")
        self._marks.update(cp.marks)
        if cp.offsets and self._consumer is not None:
            tps = [TopicPartition(t, p, o) for (t, p), o in sorted(cp.offsets.items())]
            self._commit_offsets(self._consumer, tps, in_revoke=in_revoke)
            self.faults.hit("after_commit")
        self.checkpoints += 1
        self._write_stats()

    def _start_transactions(self, base: dict[str, str]) -> TransactionalCheckpoint:
        """``exactly_once``: the transactional producer, checked before joining the group.

        A broker without transaction isolation is refused with one clear line.
        """
        conf = producer_conf(self.settings)
        txn = TransactionalCheckpoint(
            conf,
            transactional_id(self.settings.group_id, self.settings.member_name),
            timeout_ms=self.settings.transaction_timeout_ms,
        )
        txn.start()
        txn.check_isolation(self.topics.changelog, reader_conf(base))
        return txn

    def _commit_transaction(self, outputs: list[Outbound], cp: CheckpointRecords) -> None:
        """``exactly_once``: the batch's outputs, changelog and offsets in one transaction."""
        if self._txn is None or self._consumer is None:
            raise TransientError("the transactional producer or the consumer is closed")
        t0 = time.perf_counter()
        self._txn.commit(
            outputs,
            cp.records,
            cp.offsets,
            self._consumer,
            before_commit=lambda: self.faults.hit("after_changelog"),
        )
        self.faults.hit("after_commit")
        self._marks.update(cp.marks)
        if cp.records:
            self.checkpoints += 1
            self._write_stats()
        self.metrics.checkpoint.observe(time.perf_counter() - t0)

    def _checkpoint(self, *, in_revoke: bool = False) -> None:
        """Drain the pipeline: everything processed is durable and committed."""
        self._settle(in_revoke=in_revoke)
        self._settle(in_revoke=in_revoke)

    def _commit_offsets(
        self, consumer: Consumer, tps: list[TopicPartition], *, in_revoke: bool
    ) -> None:
        """Commit synchronously, check every partition's result, retry what failed.

        A commit that raises is retried whole; one whose result names failed partitions
        is retried for those. After :data:`_COMMIT_ATTEMPTS` it raises, unless the member
        lost its generation (a rebalance: the marks just flushed are authoritative and
        the next owner resumes from them) or the commit runs in a revoke.

        Raises:
            TransientError: A partition could not be committed.
        """
        todo, wait = tps, 0.2
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
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
            self.metrics.commit_retries.inc(len(todo))
            log.warning(
                "commit_partition_failed", partitions=failed_names, error=error, attempt=attempt
            )
            if attempt == _COMMIT_ATTEMPTS:
                raise TransientError(
                    f"offset commit failed for {', '.join(failed_names)} after {attempt} "
                    f"attempts: {error}"
                )
            time.sleep(wait)
            wait *= 2

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        stats: dict[str, Any] = {
            "pid": os.getpid(),
            "group": self.settings.group_id,
            "model_version": self.handler.model_version,
            "updated_time": int(time.time() * 1000),
            "batches": self.batches,
            "checkpoints": self.checkpoints,
            "rebalances": self.rebalances,
            "restored_items": self.restored_items,
            "paused": sorted(self.flow.paused),
            "pauses": self.pauses,
            "partitions": self.processor.partitions,
            "items_in_state": len(self.processor.store),
            "pending": len(self.processor.pending),
            "process": self.processor.counts.to_dict(),
            "marks": {
                str(p): {"positions": m.positions, "counts": m.counts.to_dict()}
                for p, m in sorted(self._marks.items())
            },
        }
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(stats, indent=1) + "\n")
        tmp.replace(self.stats_path)

    # -- rebalance callbacks (run inside consume) ------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self.rebalances += 1
            self._epoch += 1
            by_topic: dict[str, set[int]] = {
                self.topics.items: set(),
                self.topics.interactions: set(),
            }
            for tp in partitions:
                by_topic.setdefault(tp.topic, set()).add(tp.partition)
            numbers = by_topic[self.topics.items]
            if numbers != by_topic[self.topics.interactions]:
                raise ConfigError(
                    f"assigned items partitions {sorted(numbers)} but interactions partitions "
                    f"{sorted(by_topic[self.topics.interactions])}: not co-assigned"
                )
            if self._restorer is None:
                raise TransientError("restore consumer is closed")
            restored = restore_partitions(
                self._restorer,
                self.topics.changelog,
                sorted(numbers),
                self.processor.codec,
                timeout_s=_RESTORE_TIMEOUT_S,
            )
            self.faults.hit("during_restore")
            tps = []
            self.restored_items += sum(len(r.items) for r in restored.values())
            for p in sorted(numbers):
                r = restored[p]
                starts = self.processor.assign(p, r.items, r.mark, r.suspect)
                if r.mark is not None:
                    self._marks[p] = r.mark
                for role in INPUT_ROLES:
                    off = starts[role]
                    tp = TopicPartition(
                        self.topics.name(role), p, OFFSET_STORED if off is None else off
                    )
                    tps.append(tp)
            consumer.assign(tps)
            self.flow.assigned(numbers, time.monotonic())
            self._last_activity = time.monotonic()
            self._write_stats()
            log.info(
                "partitions_assigned",
                partitions=sorted(numbers),
                items=sum(len(r.items) for r in restored.values()),
                starts={f"{tp.topic}[{tp.partition}]": tp.offset for tp in tps},
            )
        except BaseException:
            self._failed = True
            raise

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._epoch += 1
        numbers = sorted({tp.partition for tp in partitions})
        try:
            if not self._failed:
                self._checkpoint(in_revoke=True)
        except BaseException:
            self._failed = True
            raise
        finally:
            for p in numbers:
                self.processor.revoke(p)
            self.flow.revoked(numbers)
            consumer.unassign()
        log.info("partitions_revoked", partitions=numbers)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._epoch += 1
        numbers = sorted({tp.partition for tp in partitions})
        # Another member may own them now: what is not yet in the changelog stays out
        # of it (its records are replayed by the new owner from the last mark).
        self._held = self._sent = None
        for p in numbers:
            self.processor.revoke(p)
        self.flow.revoked(numbers)
        log.warning("partitions_lost", partitions=numbers)

    def _close(self) -> None:
        if self._consumer is not None:
            # close() revokes: the revoke callback checkpoints (unless the loop failed).
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            # exactly_once: each batch's commit flushed it; a fenced producer would raise
            if self._txn is None:
                self._producer.flush(_FLUSH_TIMEOUT_S)
            self._producer = None
        if self._restorer is not None:
            self._restorer.close()
            self._restorer = None
        self._write_stats()
        self.metrics.close()
        log.info(
            "worker_stopped",
            batches=self.batches,
            checkpoints=self.checkpoints,
            counts=self.processor.counts.to_dict(),
        )
