"""The embedded broker itself: start/stop, faults, authentication, and the broker job."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from emerg_stream.errors import ConfigError
from emerg_stream.stream.broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUIET = logging.getLogger("tests.librdkafka")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


def admin(bootstrap: str, **extra: object) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "logger": QUIET, **extra})


@pytest.mark.timeout(30)
def test_starts_answers_and_stops_cleanly() -> None:
    started = time.monotonic()
    broker = EmbeddedBroker()
    with broker:
        startup_s = time.monotonic() - started
        host, port = broker.bootstrap.split(":")
        assert host == "127.0.0.1"
        md = admin(broker.bootstrap).list_topics(timeout=5)
        assert md.cluster_id == broker.cluster_id
        assert [b.port for b in md.brokers.values()] == [int(port)]
        proc_pid = broker.pid
        stop_started = time.monotonic()
    stop_s = time.monotonic() - stop_started
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(proc_pid, 0)
    with pytest.raises(ConfigError):
        _ = broker.bootstrap
    print(f"embedded broker: ready in {startup_s * 1000:.0f} ms, stopped in {stop_s * 1000:.0f} ms")
    assert stop_s < 2.0  # SIGINT: Tansu exits at once even with clients connected


@pytest.mark.timeout(30)
def test_pause_freezes_and_resume_recovers() -> None:
    with EmbeddedBroker() as broker:
        client = admin(broker.bootstrap)
        client.list_topics(timeout=5)
        broker.pause()
        with pytest.raises(KafkaException) as info:
            client.list_topics(timeout=1.0)
        # no answer: the request times out (or the half-open connection is dropped)
        assert info.value.args[0].code() in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT)
        broker.resume()
        assert client.list_topics(timeout=5).cluster_id == broker.cluster_id
        broker.pause()  # a paused broker still stops promptly
    assert not broker.running


@pytest.mark.timeout(30)
def test_a_taken_port_is_refused_not_shared() -> None:
    with EmbeddedBroker() as first:
        with pytest.raises(ConfigError, match="in use"):
            EmbeddedBroker(port=first.port).start()
        assert admin(first.bootstrap).list_topics(timeout=5).cluster_id == first.cluster_id


def _auth_errors(conf: dict[str, object], deadline_s: float = 8.0) -> list[KafkaError]:
    """Connect, and collect the client's errors until an authentication error arrives."""
    errors: list[KafkaError] = []
    client = AdminClient({**conf, "error_cb": errors.append, "logger": QUIET})
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with pytest.raises(KafkaException):
            client.list_topics(timeout=0.5)  # never succeeds: no user can exist
        client.poll(0.05)
        if any(e.code() == KafkaError._AUTHENTICATION for e in errors):
            break
    return errors


@pytest.mark.timeout(60)
def test_authentication_refuses_unauthenticated_and_wrong_sasl_clients() -> None:
    """Tansu --authentication with memory storage: every client is refused, clearly.

    * no SASL: the broker resets the connection (its log: NotAuthenticated); the client
      gets a transport error and never sees metadata;
    * SASL PLAIN: no shared mechanism (Tansu offers SCRAM only);
    * SCRAM-SHA-512 with any credentials: "unknown-user" (users can only be created over
      an authenticated connection, so none can exist on a memory-only broker).
    """
    with EmbeddedBroker(authentication=True) as broker:
        base: dict[str, object] = {"bootstrap.servers": broker.bootstrap}

        with pytest.raises(KafkaException) as plain:
            admin(broker.bootstrap).list_topics(timeout=2.0)
        assert plain.value.args[0].code() == KafkaError._TRANSPORT
        assert "NotAuthenticated" in broker.log_tail(50)

        sasl = {**base, "security.protocol": "SASL_PLAINTEXT", "sasl.username": "emerg"}
        errors = _auth_errors({**sasl, "sasl.mechanism": "PLAIN", "sasl.password": "x"})
        auth = [e.str() for e in errors if e.code() == KafkaError._AUTHENTICATION]
        assert auth, [e.str() for e in errors]
        assert "mechanism handshake failed" in auth[0]

        errors = _auth_errors({**sasl, "sasl.mechanism": "SCRAM-SHA-512", "sasl.password": "x"})
        auth = [e.str() for e in errors if e.code() == KafkaError._AUTHENTICATION]
        assert auth, [e.str() for e in errors]
        assert "unknown-user" in auth[0]


JOB_DRIVER = """
import argparse, sys
from emerg_stream.logging import configure_logging
import emerg_stream.jobs.broker as job
parser = argparse.ArgumentParser()
job.add_arguments(parser)
configure_logging(json=True)
sys.exit(job.run(parser.parse_args(sys.argv[1:])))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_broker_job_prints_bootstrap_and_stops_on_signal(how: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", JOB_DRIVER, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # the job prints once the broker answers
        assert line == f"127.0.0.1:{port}"
        assert admin(line).list_topics(timeout=5).brokers
        proc.send_signal(getattr(signal, how))
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert code == 0, err
    assert out == ""  # stdout holds the bootstrap line only
    assert "broker_stopped" in err
    with pytest.raises(KafkaException):
        admin(line).list_topics(timeout=1.0)


def test_a_missing_binary_is_a_config_error(tmp_path: Path) -> None:
    broker = EmbeddedBroker(binary=tmp_path / "no-tansu")
    with pytest.raises(ConfigError, match="cannot run the Tansu binary"):
        broker.start()
    assert not broker.running
