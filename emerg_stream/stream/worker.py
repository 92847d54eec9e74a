"""The warm-up worker: one consumer-group member turning items + clicks into params.

Per micro-batch (what has been fetched, up to ``batch_max_records``; see
:meth:`Worker._next_batch`) the
:class:`~emerg_stream.stream.processor.WarmupProcessor` decodes, cold-starts new items,
scores and applies interactions in prequential rounds and runs the batched warm-up
updates, and takes the batch's checkpoint (changed item states, partition marks, input
offsets). The batch's outputs and checkpoint go to the **commit pipeline**
(:mod:`emerg_stream.stream.commit`), which owns the checkpoint order (outputs, then the
changelog, then the input offsets, each once the previous is acknowledged; pipelined so
the broker's round trips overlap the next batch's processing) and checks every
partition's commit result. An idle worker, a revoke and a stop drain it.

A crash before a batch's changelog is acknowledged replays the records since the
previous mark: params versions are recomputed identically (φ depends only on the item's
records) and re-published under the same version; predictions and dead letters may
appear twice. A crash between the changelog and the commit resumes from the mark, which is
authoritative, so nothing is applied or counted twice (see
:mod:`emerg_stream.stream.checkpointing`).

With ``processing_guarantee=exactly_once`` the pipeline is one Kafka transaction per
batch holding its outputs, its changelog records and its input offsets
(:class:`~emerg_stream.stream.commit.TransactionalPipeline`): nothing of a batch is
visible to read-committed readers before it commits, so a crash or a zombie leaves no
duplicate prediction either.

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
largest item state would not fit (:mod:`emerg_stream.stream.preflight`). An output
record refused for good is counted and the loop goes on; only an item state that cannot
be written stops the worker (:mod:`emerg_stream.stream.output`).

**Poison-pill guard**: when processing a batch raises an unexpected exception (a bug a
record finds; not an ``EmergError`` such as a broker failure or a restored state of
another model, nor a ``KafkaException``), the worker writes a
:class:`~emerg_stream.stream.checkpointing.SuspectNote` with the batch's offsets to the
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

from emerg_stream.config import WorkerSettings
from emerg_stream.errors import ConfigError, EmergError, TransientError
from emerg_stream.stream.changelog import restore_partitions
from emerg_stream.stream.clients import consumer_conf, producer_conf
from emerg_stream.stream.commit import CommitPipeline, TransactionalPipeline
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.faults import FaultInjector
from emerg_stream.stream.flow import Backpressure
from emerg_stream.stream.handler import WarmupHandler
from emerg_stream.stream.lag import assigned_lag
from emerg_stream.stream.metrics import OutcomeCounts, WorkerMetrics
from emerg_stream.stream.output import FLUSH_TIMEOUT_S, OutputProducer
from emerg_stream.stream.poison import write_suspect_notes
from emerg_stream.stream.preflight import preflight
from emerg_stream.stream.processor import BatchSummary, WarmupProcessor
from emerg_stream.stream.reader import reader_conf
from emerg_stream.stream.transactions import TransactionalCheckpoint, transactional_id
from emerg_stream.topic_roles import INPUT_ROLES

__all__ = ["Worker", "consumer_conf", "producer_conf"]

log = structlog.get_logger(__name__)

_RESTORE_TIMEOUT_S = 120.0


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
        shadow: A shadow method's handler (:mod:`emerg_stream.stream.shadow`), or None.

    Raises:
        ConfigError: The shadow does not fit the primary (one line: which contract).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        handler: WarmupHandler,
        *,
        stats_path: Path | None = None,
        metrics: WorkerMetrics | None = None,
        exit_when_idle_s: float | None = None,
        shadow: WarmupHandler | None = None,
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
            shadow=shadow,
        )
        #: Crash points for the fault-injection tests (``EMERG_FAULT_INJECT``; off if unset).
        self.faults = FaultInjector.from_env()
        self.processor.on_update = lambda: self.faults.hit("mid_update")
        self._stop = threading.Event()
        self._failed = False
        self._consumer: Consumer | None = None
        self._restorer: Consumer | None = None
        #: The transactional checkpoint (``exactly_once`` only).
        self._txn: TransactionalCheckpoint | None = None
        self._last_activity = time.monotonic()
        #: The output producer (its producer is made when the worker starts).
        self.output = OutputProducer(self.topics, self.metrics, lambda: self.processor.dead.serde)
        #: The commit pipeline: owns the checkpoint order (a transactional one replaces
        #: it when the worker starts with ``exactly_once``).
        self.pipeline: CommitPipeline | TransactionalPipeline = CommitPipeline(
            self.output,
            lambda: self._consumer,
            metrics=self.metrics,
            faults=self.faults,
            on_checkpoint=self._write_stats,
        )
        self.flow = Backpressure(settings.pending_max)
        self.pauses = 0
        self.batches = 0
        self.rebalances = 0
        self._epoch = 0  # bumped by every rebalance callback (see _next_batch)
        self.restored_items = 0
        #: Port of the metrics server once serving (``metrics_port=0`` picks a free one).
        self.metrics_port: int | None = None

    # -- public ----------------------------------------------------------------------

    @property
    def checkpoints(self) -> int:
        """Checkpoints committed."""
        return self.pipeline.checkpoints

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
        n = preflight(self.settings, self.handler, self.processor)
        base = self.settings.kafka.as_librdkafka()
        base.pop("partition.assignment.strategy", None)
        if self.settings.processing_guarantee == "exactly_once":
            self._txn = self._start_transactions(base)
            self.output.producer = self._txn.producer
            self.pipeline = TransactionalPipeline(
                self._txn,
                lambda: self._consumer,
                metrics=self.metrics,
                faults=self.faults,
                on_checkpoint=self._write_stats,
            )
        else:
            self.output.producer = Producer(producer_conf(self.settings))
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
        shadow = self.processor.shadow
        log.info(
            "worker_started",
            partitions=n,
            pid=os.getpid(),
            method=self.handler.layout.method,
            shadow=None if shadow is None else f"{shadow.layout.method} {shadow.model_version}",
        )
        try:
            while not self._stop.is_set():
                batch = self._inbound(self._next_batch(self._consumer))
                if batch:
                    self.pipeline.polled(self._consumer)
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
        self.pipeline.submit(outputs, cp)
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
            shadow_predictions=summary.shadow_predictions,
            update_ms=round(summary.update_s * 1000, 1),
            process_ms=round((t1 - t0) * 1000, 1),
            settle_ms=round((time.perf_counter() - t1) * 1000, 1),
            states_written=cp_items,
        )

    # -- checkpointing -------------------------------------------------------------

    def _suspect(self, batch: list[Inbound], exc: BaseException) -> None:
        """The poison-pill guard: note the batch's offsets in the changelog, then exit."""
        write_suspect_notes(self.settings, batch, exc, self.processor.suspects)

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

    def _checkpoint(self, *, in_revoke: bool = False) -> None:
        """Drain the commit pipeline: everything processed is durable and committed."""
        self.pipeline.drain(in_revoke=in_revoke)

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
            "shadow_model_version": None
            if (sh := self.processor.shadow) is None
            else sh.model_version,
            "shadow_dropped": self.processor.shadow_dropped,
            "process": self.processor.counts.to_dict(),
            "marks": {
                str(p): {"positions": m.positions, "counts": m.counts.to_dict()}
                for p, m in sorted(self.pipeline.marks.items())
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
                    self.pipeline.marks[p] = r.mark
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
        self.pipeline.drop()
        for p in numbers:
            self.processor.revoke(p)
        self.flow.revoked(numbers)
        log.warning("partitions_lost", partitions=numbers)

    def _close(self) -> None:
        if self._consumer is not None:
            # close() revokes: the revoke callback checkpoints (unless the loop failed).
            self._consumer.close()
            self._consumer = None
        if self.output.producer is not None:
            # exactly_once: each batch's commit flushed it; a fenced producer would raise
            if self._txn is None:
                self.output.producer.flush(FLUSH_TIMEOUT_S)
            self.output.producer = None
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
