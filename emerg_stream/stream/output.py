"""The worker's output producer: produce in order, retry what is transient, count refusals.

Error policy (docs/RELIABILITY.md): an output record refused for good
(``MSG_SIZE_TOO_LARGE`` and the like, at ``produce`` or on delivery) is logged and counted
(``emerg_worker_outputs_refused_total``), a refused dead letter is re-sent without its raw
bytes, and the loop goes on; only an item state that cannot be written stops the worker
(the changelog must hold what the marks claim). A transient ``produce`` error is retried
with backoff; a failed delivery of anything else surfaces at the next :meth:`flush`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from emerg_stream.config import TopicSettings
from emerg_stream.errors import SchemaError, TransientError
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import DeadLetter
from emerg_stream.stream.envelope import Outbound
from emerg_stream.stream.metrics import WorkerMetrics

__all__ = ["FLUSH_TIMEOUT_S", "OutputProducer"]

log = structlog.get_logger(__name__)

#: Seconds a flush waits for every produced record to be acknowledged.
FLUSH_TIMEOUT_S = 30.0
#: A transient ``produce`` error is retried this long (backoff 50 ms doubling to 2 s).
_PRODUCE_RETRY_S = 30.0
#: Delivery errors that belong to one record (it can never be written), not to the broker.
_RECORD_ERRORS = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_MSG,
}


class OutputProducer:
    """Produces the worker's records (see the module docstring).

    Args:
        topics: Topic names (the changelog's and dead-letter topic's records are special).
        metrics: Where refusals are counted.
        dead_serde: The dead-letter serde (to re-send a refused dead letter bare).
        producer: The producer; set later (:attr:`producer`) when the worker starts.
    """

    def __init__(
        self,
        topics: TopicSettings,
        metrics: WorkerMetrics,
        dead_serde: Callable[[], AvroSerde[DeadLetter]],
        producer: Producer | None = None,
    ) -> None:
        self.topics = topics
        self.metrics = metrics
        self.dead_serde = dead_serde
        self.producer = producer
        self._delivery_error: KafkaError | None = None

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """Delivery callback: a record's own refusal is counted, any other error kept."""
        if err is None:
            return
        topic = msg.topic() or ""
        if err.code() in _RECORD_ERRORS and topic != self.topics.changelog:
            self.refused(topic, msg.value(), err)  # that record only: the loop goes on
            return
        if self._delivery_error is None:
            self._delivery_error = err

    def refused(self, topic: str, value: bytes | None, err: KafkaError) -> None:
        """An output record refused for good: logged and counted; a dead letter re-sent bare."""
        self.metrics.outputs_refused.labels(topic=topic, error=err.name()).inc()
        log.error(
            "output_refused", topic=topic, bytes=len(value or b""), error=err.str(), code=err.name()
        )
        if topic != self.topics.dead_letter or value is None or self.producer is None:
            return
        serde = self.dead_serde()
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
            self.producer.produce(topic, serde.encode(bare), on_delivery=self.on_delivery)
        except (KafkaException, BufferError) as exc:  # logged; the dead letter is then lost
            log.error("dead_letter_not_resent", error=str(exc))

    def produce(self, records: list[Outbound]) -> None:
        """Produce ``records`` in order (see the module docstring for the error policy).

        Raises:
            TransientError: The producer is closed, a transient error outlasted
                ``_PRODUCE_RETRY_S``, or an item state was refused.
        """
        producer = self.producer
        if producer is None:
            raise TransientError("the producer is closed")
        for r in records:
            self._produce_one(producer, r)

    def _produce_one(self, producer: Producer, r: Outbound) -> None:
        wait, deadline = 0.05, time.monotonic() + _PRODUCE_RETRY_S
        while True:
            try:
                if r.partition is None:
                    producer.produce(r.topic, r.value, r.key, on_delivery=self.on_delivery)
                else:
                    producer.produce(
                        r.topic, r.value, r.key, r.partition, on_delivery=self.on_delivery
                    )
                return
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
                self.refused(r.topic, r.value, err)
                return

    def flush(self) -> None:
        """Wait until everything produced is acknowledged.

        Raises:
            TransientError: Records left undelivered, or a delivery failed.
        """
        producer = self.producer
        if producer is None:
            return
        left = producer.flush(FLUSH_TIMEOUT_S)
        if left:
            raise TransientError(f"{left} records not delivered within {FLUSH_TIMEOUT_S}s")
        if self._delivery_error is not None:
            err, self._delivery_error = self._delivery_error, None
            raise TransientError(f"delivery failed: {err.str()}")
