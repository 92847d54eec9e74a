"""The worker's start-up check: topics exist, are co-partitioned, readable and writable.

The topics it reads and writes come from the role table
(:mod:`emerg_stream.topic_roles`). It also reads the changelog's and dead-letter topic's
record size limits and refuses input bounds whose largest item state would not fit
(:mod:`emerg_stream.stream.limits`).
"""

from __future__ import annotations

import structlog
from confluent_kafka.admin import AdminClient

from emerg_stream.config import WorkerSettings
from emerg_stream.errors import ConfigError
from emerg_stream.stream.clients import producer_conf
from emerg_stream.stream.connect import wait_for_brokers
from emerg_stream.stream.handler import WarmupHandler
from emerg_stream.stream.limits import check_state_fits, read_output_limits
from emerg_stream.stream.processor import WarmupProcessor
from emerg_stream.stream.topics import check_access, check_copartitioned, topic_partitions
from emerg_stream.topic_roles import read_roles, written_roles

__all__ = ["preflight"]

log = structlog.get_logger(__name__)


def preflight(settings: WorkerSettings, handler: WarmupHandler, processor: WarmupProcessor) -> int:
    """Check the topics and size the processor's outputs to their record limits.

    Returns:
        The input partition count.

    Raises:
        ConfigError: Topics missing, not co-partitioned, not accessible, a changelog with
            fewer partitions than the inputs, or input bounds whose state would not fit.
    """
    topics = settings.topics
    conf: dict[str, str | int | float | bool] = dict(settings.kafka.as_librdkafka())
    outputs = [topics.name(role) for role in written_roles()]
    wait_for_brokers(settings)
    refused: str | None = None
    admin = AdminClient(conf)
    try:
        n = check_copartitioned(admin, topics.items, topics.interactions)
        counts = topic_partitions(admin, outputs)
        who = settings.kafka.sasl_username
        check_access(
            admin,
            [topics.name(role) for role in read_roles()],
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
    if counts[topics.changelog] < n:
        raise ConfigError(
            f"changelog {topics.changelog!r} has {counts[topics.changelog]} "
            f"partitions, fewer than the {n} input partitions it mirrors"
        )
    admin = AdminClient(conf)
    try:
        limits = read_output_limits(
            admin, topics.changelog, topics.dead_letter, producer_conf(settings)
        )
    finally:
        del admin
    bound = check_state_fits(
        settings.inputs,
        limits,
        k=handler.k,
        dedupe_window=settings.dedupe_window,
        n_fields=handler.n_fields,
        dim=handler.dim,
        shadow_floats=0 if (s := processor.shadow) is None else s.layout.adjacency_size + s.dim,
    )
    processor.use_limits(limits)
    log.info(
        "record_limits",
        changelog=limits.changelog,
        dead_letter=limits.dead_letter,
        sources=dict(limits.sources or {}),
        state_bound=bound,
    )
    return n
