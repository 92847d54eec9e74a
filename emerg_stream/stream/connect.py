"""Reach the cluster at start: retry with backoff, then fail with one clear line.

A job that starts before its brokers (a compose stack, a rolling restart) waits for them
for ``startup_retries`` attempts, the wait doubling from ``startup_backoff_ms`` up to
``startup_backoff_max_ms``. An authentication failure is not retried: the answer will
not change. The error names the bootstrap address and the security settings (protocol,
SASL mechanism, user), never a secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from emerg_stream.config import KafkaSettings, WorkerSettings
from emerg_stream.errors import ConfigError, TransientError

__all__ = ["describe_access", "wait_for_brokers"]

log = structlog.get_logger(__name__)

#: How long one attempt waits for the cluster's metadata.
PROBE_TIMEOUT_S = 5.0
#: How librdkafka words a TLS failure it reports as a transport error.
_HANDSHAKE = "SSL handshake failed"
_AUTH_CODES = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}


def describe_access(kafka: KafkaSettings) -> str:
    """``bootstrap (protocol[, SASL mechanism as user])``: how we tried, without secrets."""
    how: str = kafka.security_protocol
    if kafka.sasl_mechanism is not None:
        how += f", SASL {kafka.sasl_mechanism}"
        if kafka.sasl_username:
            how += f" as user {kafka.sasl_username!r}"
    return f"{kafka.bootstrap_servers} ({how})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def wait_for_brokers(
    settings: WorkerSettings, *, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Block until the cluster answers a metadata request.

    Raises:
        ConfigError: The cluster refused our credentials (authentication or authorization).
        TransientError: No broker answered within the retry budget.
    """
    errors: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        errors.append(err)

    conf: dict[str, Any] = dict(settings.kafka.as_librdkafka())
    conf.pop("partition.assignment.strategy", None)
    # librdkafka's own connection errors would print one line per try; the outcome is
    # reported below, once.
    conf.update({"error_cb": on_error, "log_level": 0})
    attempts = settings.startup_retries + 1
    wait_s = settings.startup_backoff_ms / 1000
    t0 = time.monotonic()
    admin = AdminClient(conf)
    try:
        for attempt in range(1, attempts + 1):
            try:
                admin.list_topics(timeout=PROBE_TIMEOUT_S)
                if attempt > 1:
                    log.info("brokers_reached", attempts=attempt)
                return
            except KafkaException as exc:
                errors.append(exc.args[0])
            admin.poll(0.1)  # serve error_cb: an authentication failure shows only there
            auth = [e for e in errors if e.code() in _AUTH_CODES]
            if auth:
                raise ConfigError(
                    f"the cluster at {describe_access(settings.kafka)} refused access: "
                    f"{_one_line(auth[-1].str())}"
                )
            tls = [e for e in errors if e.code() == KafkaError._SSL or _HANDSHAKE in e.str()]
            if tls:
                raise ConfigError(
                    f"TLS with the cluster at {describe_access(settings.kafka)} failed (is "
                    f"EMERG_KAFKA__SSL_CA_LOCATION the CA that signed the brokers' "
                    f"certificates?): {_one_line(tls[-1].str())}"
                )
            if attempt == attempts:
                break
            log.warning(
                "brokers_unreachable",
                bootstrap=settings.kafka.bootstrap_servers,
                attempt=attempt,
                retry_in_s=wait_s,
            )
            sleep(wait_s)
            wait_s = min(wait_s * 2, settings.startup_backoff_max_ms / 1000)
    finally:
        del admin
    last = _one_line(errors[-1].str()) if errors else "no answer"
    raise TransientError(
        f"no Kafka broker answered at {describe_access(settings.kafka)} after {attempts} "
        f"attempts in {time.monotonic() - t0:.0f}s (last error: {last})"
    )
