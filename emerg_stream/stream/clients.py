"""Client settings of the worker: the group consumer and the idempotent output producer."""

from __future__ import annotations

from emerg_stream.config import WorkerSettings
from emerg_stream.errors import ConfigError

__all__ = ["consumer_conf", "producer_conf"]


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
