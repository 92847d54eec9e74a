"""Kafka's own record size limits, read at start, and the largest item state they must hold.

A record is refused when it is larger than the producer's ``message.max.bytes``
(librdkafka raises ``MSG_SIZE_TOO_LARGE`` at ``produce``; 1,000,000 by default) or than
the topic's ``max.message.bytes`` (the broker refuses the batch; the broker's
``message.max.bytes`` when the topic sets none, 1,048,588 by default on Kafka). The
worker reads both for the two topics whose records grow with the input, the changelog
(``ItemState``) and the dead-letter topic (``DeadLetter``, which carries the raw input),
and sizes what it writes to fit (:class:`OutputLimits`):

* a dead letter whose raw key and value would not fit carries them cut, with their
  original length and sha256 (:class:`~emerg_stream.stream.dlq.DeadLetters`);
* an item state never exceeds the changelog's limit: :func:`state_bound` is the largest
  state the input bounds allow (``EMERG_INPUTS__*``) and :func:`check_state_fits` refuses
  a configuration where it would not fit; should a state still be too large (a topic
  limit lowered later), the oldest support rows are dropped and counted
  (:meth:`~emerg_stream.stream.processor.WarmupProcessor.checkpoint`).

Brokers that describe only the configs set on a topic (Tansu) get Kafka's defaults for the
rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not in admin's __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)

from emerg_stream.config import InputSettings
from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.phases import WarmupSchedule
from emerg_stream.stream.topics import topic_configs

__all__ = [
    "BATCH_OVERHEAD",
    "KAFKA_TOPIC_DEFAULT",
    "PRODUCER_DEFAULT",
    "OutputLimits",
    "check_state_fits",
    "read_output_limits",
    "state_bound",
]

#: librdkafka's default ``message.max.bytes`` (the producer's own limit).
PRODUCER_DEFAULT = 1_000_000
#: Kafka's default topic ``max.message.bytes`` (the broker's ``message.max.bytes``).
KAFKA_TOPIC_DEFAULT = 1_048_588
#: Bytes of a record batch and record header kept free below a limit.
BATCH_OVERHEAD = 512


@dataclass(frozen=True)
class OutputLimits:
    """Largest record (key + value, bytes) each output topic takes, overhead deducted.

    Args:
        changelog: The state changelog.
        dead_letter: The dead-letter topic.
        sources: Where each number came from (for the start-up log line).
    """

    changelog: int = PRODUCER_DEFAULT - BATCH_OVERHEAD
    dead_letter: int = PRODUCER_DEFAULT - BATCH_OVERHEAD
    sources: Mapping[str, str] | None = None


def _broker_limit(admin: AdminClient, timeout_s: float) -> int | None:
    """The brokers' ``message.max.bytes`` if one of them describes it."""
    try:
        brokers = list(admin.list_topics(timeout=timeout_s).brokers)
    except KafkaException:  # optional information: the default applies
        return None
    for b in brokers[:1]:
        res = ConfigResource(ResourceType.BROKER, str(b))
        try:
            entries = admin.describe_configs([res], request_timeout=timeout_s)[res].result(
                timeout=timeout_s
            )
        except (KafkaException, TimeoutError):  # Tansu describes no broker: the default
            return None
        entry = entries.get("message.max.bytes")
        if entry is not None and entry.value is not None:
            return int(entry.value)
    return None


def read_output_limits(
    admin: AdminClient,
    changelog: str,
    dead_letter: str,
    producer_conf: Mapping[str, str],
    *,
    timeout_s: float = 10.0,
) -> OutputLimits:
    """Describe the two topics (and a broker) and combine with the producer's limit.

    Raises:
        TransientError: The cluster did not answer the describe request.
        ConfigError: A limit that is not a number.
    """
    try:
        producer = int(producer_conf.get("message.max.bytes", PRODUCER_DEFAULT))
        configs = topic_configs(admin, [changelog, dead_letter], timeout_s=timeout_s)
        broker = None
        if any("max.message.bytes" not in configs.get(t, {}) for t in (changelog, dead_letter)):
            broker = _broker_limit(admin, timeout_s)
        out: dict[str, int] = {}
        sources: dict[str, str] = {}
        for role, topic in (("changelog", changelog), ("dead_letter", dead_letter)):
            raw = configs.get(topic, {}).get("max.message.bytes")
            if raw is not None:
                limit, src = int(raw), f"topic max.message.bytes={raw}"
            elif broker is not None:
                limit, src = broker, f"broker message.max.bytes={broker}"
            else:
                limit, src = KAFKA_TOPIC_DEFAULT, f"Kafka default {KAFKA_TOPIC_DEFAULT}"
            if producer < limit:
                limit, src = producer, f"producer message.max.bytes={producer}"
            out[role] = limit - BATCH_OVERHEAD
            sources[role] = src
    except ValueError as exc:
        raise ConfigError(f"a record size limit is not a number: {exc}") from exc
    except TransientError:
        raise
    return OutputLimits(out["changelog"], out["dead_letter"], sources)


def state_bound(
    inputs: InputSettings,
    *,
    k: int,
    dedupe_window: int,
    n_fields: int,
    dim: int,
    shadow_floats: int = 0,
) -> int:
    """Upper bound of one item's ``ItemState`` record (key + framed value), in bytes.

    The item id (key and field) and every string are at most ``max_string_bytes``; the
    side features at most ``max_value_bytes`` (they arrived in one ItemEvent); at most
    ``K`` support rows of at most ``max_support_row_bytes``; the de-duplication window
    (8-byte hashes and 4-byte content hashes); φ (``F*F + D`` floats); two source offsets
    and the fixed fields (a generous 512 bytes); with a shadow method, its φ
    (``shadow_floats`` floats) and its model version (64 bytes).
    """
    ids = 2 * (inputs.max_string_bytes + 5)
    side = inputs.max_value_bytes
    support = WarmupSchedule(k).max_support_rows * inputs.max_support_row_bytes + 10
    window = dedupe_window * 12 + 20
    phi = 4 * (n_fields * n_fields + dim) + 20
    offsets = 2 * (inputs.max_string_bytes + 30)
    shadow = 4 * shadow_floats + 84 if shadow_floats else 0
    return ids + side + support + window + phi + offsets + shadow + 512


def check_state_fits(
    inputs: InputSettings,
    limits: OutputLimits,
    *,
    k: int,
    dedupe_window: int,
    n_fields: int,
    dim: int,
    shadow_floats: int = 0,
) -> int:
    """Refuse input bounds whose largest item state would not fit the changelog.

    Returns:
        The bound (:func:`state_bound`).

    Raises:
        ConfigError: It does not fit; the message says what to lower or raise.
    """
    bound = state_bound(
        inputs,
        k=k,
        dedupe_window=dedupe_window,
        n_fields=n_fields,
        dim=dim,
        shadow_floats=shadow_floats,
    )
    if bound > limits.changelog:
        src = (limits.sources or {}).get("changelog", "")
        raise ConfigError(
            f"an item state can reach {bound:,} bytes (K={k} support rows of "
            f"EMERG_INPUTS__MAX_SUPPORT_ROW_BYTES={inputs.max_support_row_bytes:,}, side "
            f"features up to EMERG_INPUTS__MAX_VALUE_BYTES={inputs.max_value_bytes:,}, a "
            f"de-duplication window of {dedupe_window:,}, F={n_fields}, D={dim}) but the "
            f"changelog takes records of at most {limits.changelog:,} bytes ({src}): lower "
            f"those settings, or raise the changelog topic's max.message.bytes and the "
            f"producer's message.max.bytes (EMERG_KAFKA__EXTRA)"
        )
    return bound
