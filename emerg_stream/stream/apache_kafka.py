"""The reference broker: Apache Kafka (KRaft, one combined node) on 127.0.0.1.

The jars come from Maven Central (``org.apache.kafka:kafka_2.13`` and its runtime
dependencies, plus the log4j2 binding of slf4j), fetched once with ``mvn
dependency:copy-dependencies`` into a cache folder outside the repository:
``$EMERG_KAFKA_CACHE`` or ``~/.cache/emerg-stream/kafka-<version>`` (honours
``$XDG_CACHE_HOME``). Java 17 or newer runs them (``$JAVA_HOME/bin/java``, else ``java``).

Each :class:`ApacheKafka` start makes a fresh run folder (temporary, removed on stop)
with a generated ``server.properties``, a self-signed CA and a server certificate for
127.0.0.1 (openssl), formats the storage with the SCRAM users
(``kafka-storage format --add-scram``), starts the node and creates the ACLs. Listeners:

* ``PLAINTEXT`` (:attr:`ApacheKafka.bootstrap`): the principal ``User:ANONYMOUS`` is a
  **super user**, for tests and development on the loopback only (also the
  inter-broker and controller listeners). Never expose it.
* ``SASL_SSL`` (:attr:`ApacheKafka.sasl_bootstrap`): SCRAM-SHA-512 over TLS, the
  server certificate signed by the run's CA (:attr:`ApacheKafka.ca_path`). Users
  (:data:`PRINCIPALS`): ``emerg-worker`` (reads, writes and creates topics, consumer
  groups and transactional ids), ``emerg-ranker`` (read-only: topics and groups), and
  ``emerg-admin`` (super user). Their passwords are random per start, written only to
  ``<run>/<user>.env`` (mode 0600) as ``EMERG_KAFKA__*`` variables, never logged.

The authorizer is the StandardAuthorizer (ACLs in the KRaft metadata log). Transactions
are on (one replica for the internal topics; timed-out transactions are looked for every
second, not every 10 s); the log cleaner wakes every second
(``log.cleaner.backoff.ms=1000``) so a topic with small segments compacts in seconds.

Example:
    >>> with ApacheKafka() as kafka:                           # doctest: +SKIP
    ...     producer = Producer({"bootstrap.servers": kafka.bootstrap})
    ...     secure = Producer(kafka.client_conf("emerg-worker"))
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import structlog

from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.stream.broker import HOST, _pdeathsig_hook, free_port
from emerg_stream.stream.child import ChildServer
from emerg_stream.stream.kafka_acl import PRINCIPALS, Principal, acl_bindings
from emerg_stream.stream.kafka_dist import (
    KAFKA_VERSION,
    fetch_kafka,
    find_java,
    kafka_cache_dir,
    make_tls,
)

__all__ = [
    "KAFKA_VERSION",
    "PRINCIPALS",
    "ApacheKafka",
    "Principal",
    "fetch_kafka",
    "find_java",
    "kafka_cache_dir",
]

log = structlog.get_logger(__name__)


_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
"""


class ApacheKafka(ChildServer):
    """Apache Kafka in a child JVM, KRaft combined mode, on 127.0.0.1 (module docstring).

    Use as a context manager. The child gets SIGTERM when this process dies (Linux), and
    :meth:`stop` sends SIGTERM (a controlled shutdown) and SIGKILL after
    ``stop_timeout_s``. The run folder (data, certificates, credentials) is removed then.

    Args:
        version: Kafka version (see :func:`fetch_kafka`).
        heap_mb: JVM heap (``-Xmx``).
        start_timeout_s: How long to wait for the node to answer.
        stop_timeout_s: Grace period between SIGTERM and SIGKILL.
        broker_config: More ``server.properties`` entries (they win over the generated
            ones).
        run_dir: Keep the run here instead of a temporary folder (not removed on stop).
        port: Port of the PLAINTEXT listener (default: a free one; the others are free
            ones always).
    """

    def __init__(
        self,
        *,
        version: str = KAFKA_VERSION,
        heap_mb: int = 1024,
        start_timeout_s: float = 90.0,
        stop_timeout_s: float = 20.0,
        broker_config: Mapping[str, str] | None = None,
        run_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"port {port} out of range 1..65535")
        self._port_arg = port
        self.version = version
        self.heap_mb = heap_mb
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.broker_config = dict(broker_config or {})
        self._run_dir_arg = run_dir
        self.cluster_id = ""
        self.run_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self._passwords: dict[str, str] = {}
        super().__init__()
        #: Seconds the last :meth:`start` took, by phase (``fetch``, ``tls``,
        #: ``format``, ``boot``, ``acls``, ``total``).
        self.timings: dict[str, float] = {}

    # -- public API ------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the PLAINTEXT listener (super user; loopback only)."""
        return f"{HOST}:{self._port('PLAINTEXT')}"

    @property
    def sasl_bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the SASL_SSL (SCRAM-SHA-512) listener."""
        return f"{HOST}:{self._port('SASL_SSL')}"

    @property
    def ca_path(self) -> Path:
        """PEM file of the CA that signed the broker's certificate."""
        return self._dir() / "tls" / "ca.pem"

    def env_file(self, user: str) -> Path:
        """``<run>/<user>.env``: ``EMERG_KAFKA__*`` lines to reach the SASL_SSL listener."""
        return self._dir() / f"{user}.env"

    def client_conf(self, user: str, *, password: str | None = None) -> dict[str, str]:
        """The librdkafka settings of ``user`` on the SASL_SSL listener.

        Args:
            user: One of :data:`PRINCIPALS`.
            password: Use this password instead of the user's (to test a refusal).
        """
        if user not in self._passwords:
            raise ConfigError(f"no SCRAM user {user!r} on this broker")
        return {
            "bootstrap.servers": self.sasl_bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": self._passwords[user] if password is None else password,
            "ssl.ca.location": str(self.ca_path),
        }

    def settings_overrides(self, user: str) -> dict[str, object]:
        """``load_settings`` overrides of the ``kafka`` section for ``user`` (SASL_SSL)."""
        conf = self.client_conf(user)
        return {
            "bootstrap_servers": conf["bootstrap.servers"],
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user,
            "sasl_password": conf["sasl.password"],
            "ssl_ca_location": conf["ssl.ca.location"],
        }

    def start(self) -> Self:
        """Fetch (once), configure, format and start the node; create the ACLs.

        Raises:
            ConfigError: Already started; no Java, Maven or openssl.
            TransientError: It exited or did not answer in time (message: its log tail).
        """
        if self._proc is not None:
            raise ConfigError("the Kafka broker is already running")
        t0 = time.monotonic()
        lib = fetch_kafka(self.version)
        java = find_java()
        self.timings = {"fetch": time.monotonic() - t0}
        for attempt in (1, 2):
            self._prepare_dir()
            try:
                self._start_once(java, lib)
                break
            except TransientError:
                tail = self.log_tail(40)
                self._terminate()
                if attempt == 1 and "Address already in use" in tail:
                    continue  # lost a port race; new ports
                raise
            except BaseException:
                self._terminate()  # no process or run folder left behind
                raise
        self.timings["total"] = time.monotonic() - t0
        log.info(
            "kafka_started",
            version=self.version,
            bootstrap=self.bootstrap,
            sasl_ssl=self.sasl_bootstrap,
            pid=self.pid,
            **{f"{k}_s": round(v, 2) for k, v in self.timings.items()},
        )
        return self

    def __repr__(self) -> str:
        where = self.bootstrap if self.running else "stopped"
        return f"ApacheKafka({self.version}, {where})"

    # -- internals -------------------------------------------------------------------

    def _port(self, listener: str) -> int:
        if self._proc is None or listener not in self.ports:
            raise ConfigError("the Kafka broker is not running")
        return self.ports[listener]

    def _dir(self) -> Path:
        if self.run_dir is None:
            raise ConfigError("the Kafka broker is not running")
        return self.run_dir

    def _prepare_dir(self) -> None:
        if self._run_dir_arg is not None:
            self.run_dir = self._run_dir_arg
            shutil.rmtree(self.run_dir / "data", ignore_errors=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.run_dir = Path(tempfile.mkdtemp(prefix="emerg-kafka-"))
        while True:
            self.ports = {name: free_port() for name in ("PLAINTEXT", "SASL_SSL", "CONTROLLER")}
            if self._port_arg is not None:
                self.ports["PLAINTEXT"] = self._port_arg
            if len(set(self.ports.values())) == len(self.ports):
                break
        self.cluster_id = _kafka_uuid()
        self._passwords = {p.name: secrets.token_urlsafe(18) for p in PRINCIPALS}

    def _start_once(self, java: Path, lib: Path) -> None:
        run = self._dir()
        t = time.monotonic()
        make_tls(run / "tls")
        self.timings["tls"] = time.monotonic() - t
        props = run / "server.properties"
        props.write_text(self._server_properties())
        (run / "log4j2.properties").write_text(_LOG4J2)
        for p in PRINCIPALS:
            self._write_env(p.name)
        t = time.monotonic()
        self._format(java, lib, props)
        self.timings["format"] = time.monotonic() - t
        t = time.monotonic()
        self._spawn(java, lib, props)
        self._wait_ready()
        self.timings["boot"] = time.monotonic() - t
        t = time.monotonic()
        self._create_acls()
        self.timings["acls"] = time.monotonic() - t

    def _server_properties(self) -> str:
        run = self._dir()
        p = self.ports
        conf = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{p['CONTROLLER']}",
            "listeners": (
                f"PLAINTEXT://{HOST}:{p['PLAINTEXT']},SASL_SSL://{HOST}:{p['SASL_SSL']},"
                f"CONTROLLER://{HOST}:{p['CONTROLLER']}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://{HOST}:{p['PLAINTEXT']},SASL_SSL://{HOST}:{p['SASL_SSL']}"
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(run / "data"),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(run / "tls" / "server-keystore.pem"),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS;User:emerg-admin",
            "allow.everyone.if.no.acl.found": "false",
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # a frozen member's open transaction is aborted within ~1 s of its timeout
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            "log.cleaner.backoff.ms": "1000",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        conf.update(self.broker_config)
        return "".join(f"{k}={v}\n" for k, v in conf.items())

    def _write_env(self, user: str) -> None:
        path = self.env_file(user)
        lines = {
            "EMERG_KAFKA__BOOTSTRAP_SERVERS": f"{HOST}:{self.ports['SASL_SSL']}",
            "EMERG_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "EMERG_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "EMERG_KAFKA__SASL_USERNAME": user,
            "EMERG_KAFKA__SASL_PASSWORD": self._passwords[user],
            "EMERG_KAFKA__SSL_CA_LOCATION": str(self.ca_path),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in lines.items())

    def _java_argv(self, java: Path, lib: Path, main: str) -> list[str]:
        return [
            str(java),
            f"-Xmx{self.heap_mb}m",
            f"-Xms{min(self.heap_mb, 256)}m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._dir() / 'log4j2.properties'}",
            "-cp",
            str(lib / "*"),
            main,
        ]

    def _format(self, java: Path, lib: Path, props: Path) -> None:
        argv = [
            *self._java_argv(java, lib, "kafka.tools.StorageTool"),
            "format",
            "--cluster-id",
            self.cluster_id,
            "--config",
            str(props),
            "--ignore-formatted",
        ]
        for p in PRINCIPALS:
            argv += [
                "--add-scram",
                f"SCRAM-SHA-512=[name={p.name},password={self._passwords[p.name]}]",
            ]
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            argv, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            # the output echoes the SCRAM arguments; show only the error lines, masked
            text = done.stdout + done.stderr
            for secret in self._passwords.values():
                text = text.replace(secret, "***")
            tail = "\n".join(text.strip().splitlines()[-8:])
            raise ConfigError(f"kafka-storage format failed (exit {done.returncode}):\n{tail}")

    def _spawn(self, java: Path, lib: Path, props: Path) -> None:
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in _terminate
            prefix="kafka-", suffix=".log", dir=self._dir(), delete=False
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "JAVA_TOOL"))}
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [*self._java_argv(java, lib, "kafka.Kafka"), str(props)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._dir(),
                start_new_session=True,
                preexec_fn=_pdeathsig_hook(),
            )
        except OSError as exc:
            raise ConfigError(f"cannot run {java}: {exc}") from exc

    def _wait_ready(self) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.start_timeout_s
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": "0"})
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TransientError(self._failure(f"no answer in {self.start_timeout_s}s"))
            try:
                md = admin.list_topics(timeout=1.0)
            except KafkaException:
                time.sleep(0.1)
                continue
            if md.cluster_id != self.cluster_id:
                raise TransientError(
                    f"another broker answers on {self.bootstrap} (cluster id {md.cluster_id!r})"
                )
            if md.brokers:
                return

    def _create_acls(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": "0"})
        futures = admin.create_acls(acl_bindings())
        try:
            for f in futures.values():
                f.result(timeout=30)
        except Exception as exc:  # re-raised as our error type
            raise TransientError(self._failure(f"could not create the ACLs: {exc}")) from exc

    _noun = "the Kafka broker"
    _stopped_event = "kafka_stopped"

    @property
    def _what(self) -> str:
        return f"Apache Kafka {self.version}"

    def _terminate(self) -> int | None:
        code = self._end_child(signal.SIGTERM, "kafka_killed")
        if self.run_dir is not None and self._run_dir_arg is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir = None
        self.ports = {}
        return code


def _kafka_uuid() -> str:
    """A random Kafka cluster id (a UUID, URL-safe base64 without padding).

    Never one starting with ``-``: kafka-storage's argument parser takes it for an option
    (one start in ~64 failed so).
    """
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid
