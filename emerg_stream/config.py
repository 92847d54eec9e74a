"""Runtime settings of the jobs, read from the environment (pydantic-settings).

Every root class reads variables with the prefix ``EMERG_``; nested sections use ``__``::

    EMERG_KAFKA__BOOTSTRAP_SERVERS=broker-1:9093,broker-2:9093
    EMERG_KAFKA__SECURITY_PROTOCOL=SASL_SSL
    EMERG_KAFKA__SASL_MECHANISM=SCRAM-SHA-512
    EMERG_KAFKA__SASL_USERNAME=emerg
    EMERG_KAFKA__SASL_PASSWORD=...            # a SecretStr: never shown by repr/str/logs
    EMERG_KAFKA__EXTRA='{"linger.ms": "5"}'   # any other librdkafka setting, as JSON
    EMERG_TOPICS__ITEMS=prod.emerg.items
    EMERG_GROUP_ID=emerg-worker               # WorkerSettings only

Settings are frozen. :meth:`KafkaSettings.as_librdkafka` is the one place that renders
librdkafka's dotted keys and unwraps secrets. Build settings with :func:`load_settings` to
get a :class:`~emerg_stream.errors.ConfigError` (one readable line per problem) instead of
a pydantic traceback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from emerg_stream.backends import WarmupBackend
from emerg_stream.errors import ConfigError
from emerg_stream.topic_roles import ROLES, TOPIC_ROLES

__all__ = [
    "InputSettings",
    "KafkaSettings",
    "SecurityProtocol",
    "Settings",
    "TopicSettings",
    "WorkerSettings",
    "load_settings",
]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]

_REDACTED = "***"


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster (``EMERG_KAFKA__*``).

    Args:
        bootstrap_servers: Comma-separated ``host:port`` list.
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        sasl_mechanism: Required with a ``SASL_*`` protocol.
        sasl_username: SASL user (PLAIN / SCRAM).
        sasl_password: SASL password (PLAIN / SCRAM); a secret.
        ssl_ca_location: CA bundle that signed the brokers' certificates.
        ssl_certificate_location: Client certificate (mutual TLS).
        ssl_key_location: Client private key (mutual TLS).
        ssl_key_password: Password of the client key; a secret.
        client_id: ``client.id`` reported to the brokers (shows in their logs and quotas).
        extra: Any other librdkafka setting, passed through verbatim. It may not repeat a
            key that a typed field renders.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = "emerg-stream"
    extra: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> KafkaSettings:
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers is empty")
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                f"sasl_mechanism is set but security_protocol is {self.security_protocol}; "
                "use SASL_SSL or SASL_PLAINTEXT"
            )
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_username and sasl_password"
            )
        clash = sorted(set(self.extra) & set(self._typed_keys()))
        if clash:
            raise ValueError(f"extra repeats keys rendered by typed settings: {clash}")
        return self

    def _typed_keys(self) -> dict[str, str | SecretStr | None]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol.lower(),
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": _path(self.ssl_ca_location),
            "ssl.certificate.location": _path(self.ssl_certificate_location),
            "ssl.key.location": _path(self.ssl_key_location),
            "ssl.key.password": self.ssl_key_password,
            "client.id": self.client_id,
        }

    def as_librdkafka(self, *, redact: bool = False) -> dict[str, str]:
        """Render the librdkafka configuration (the only place secrets are unwrapped).

        Args:
            redact: Replace secret values with ``***`` (for logging the configuration).

        Returns:
            Dotted librdkafka keys; unset options are left out, ``extra`` is merged in.
        """
        conf: dict[str, str] = {}
        for key, value in self._typed_keys().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                conf[key] = _REDACTED if redact else value.get_secret_value()
            else:
                conf[key] = value
        conf.update(self.extra)
        return conf


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _topic_settings_doc() -> str:
    roles = "\n".join(f"        {r.role}: {r.doc}" for r in TOPIC_ROLES)
    return f"""Topic names and sizes (``EMERG_TOPICS__*``).

    One name per role of :data:`~emerg_stream.topic_roles.TOPIC_ROLES` (the fields are
    made from that table). Partition counts and per-topic configs normally come from
    ``infra/topics.yaml`` (see :mod:`emerg_stream.stream.topics`); the two overrides below
    win over it.

    Args:
{roles}
        partitions: If set, the partition count of every topic except the dead-letter
            one (keeps items and interactions co-partitioned).
        replication: If set, the replication factor of every topic.
    """


class TopicSettings(BaseModel):
    """Topic names and sizes (the full text is made from the role table below)."""

    __doc__ = _topic_settings_doc()

    model_config = ConfigDict(frozen=True, extra="forbid")

    # one ``str`` field per role, default its topic name (the table is the one list)
    for _role in TOPIC_ROLES:
        __annotations__[_role.role] = "str"
        locals()[_role.role] = _role.default_name
    del _role
    partitions: int | None = Field(default=None, ge=1)
    replication: int | None = Field(default=None, ge=1)

    if TYPE_CHECKING:

        def __getattr__(self, role: str) -> str:
            """The topic name of ``role`` (a field per role of the table)."""
            ...

    def name(self, role: str) -> str:
        """The topic name of ``role``.

        Raises:
            KeyError: ``role`` is not a role of the table.
        """
        if role not in ROLES:
            raise KeyError(f"unknown topic role {role!r}; roles are {', '.join(ROLES)}")
        value: str = getattr(self, role)
        return value

    def names(self) -> dict[str, str]:
        """Return role -> topic name, for every role of the table."""
        return {role: self.name(role) for role in ROLES}

    @model_validator(mode="after")
    def _check(self) -> TopicSettings:
        names = list(self.names().values())
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"one topic name used for two roles: {dup}")
        if any(not n.strip() for n in names):
            raise ValueError("a topic name is empty")
        return self


class InputSettings(BaseModel):
    """What the worker accepts from producers (``EMERG_INPUTS__*``; docs/CLIENTS.md).

    Every bound is checked where a record enters; a record beyond one is dead-lettered with
    the ``error_kind`` named here, never processed and never a crash. At start the worker
    reads the output topics' real size limits and refuses a configuration whose largest
    item state (one full support set of ``max_support_row_bytes`` rows, the largest side
    features, the de-duplication window and φ) would not fit the changelog.

    Args:
        max_value_bytes: Largest input record (key + value, bytes) that is decoded; a
            bigger one is dead-lettered ``oversize`` before decoding (its dead letter
            carries the value cut to what the dead-letter topic takes, with its length and
            sha256). It also bounds an item's side features in its state.
        max_string_bytes: Longest id (item, event, user), feature name or token, in UTF-8
            bytes; a record with a longer one is dead-lettered ``oversize_field`` (such
            values only ever map to out-of-vocabulary anyway).
        max_support_row_bytes: Largest interaction kept in an item's support set (its
            compact encoding, bytes); a bigger one is dead-lettered ``oversize_field``.
        max_ahead_of_wall_ms: How far an event time may be ahead of the worker's wall
            clock; beyond it the record is dead-lettered ``bad_event_time`` (e.g. an event
            stamped in microseconds) and moves no clock.
        max_ahead_of_clock_ms: How far an ItemEvent's time may jump ahead of its
            partition's item clock (the largest item event time read so far, which
            expires pending interactions); beyond it the record is dead-lettered
            ``bad_event_time``. Not checked on a partition's first item. 0 turns it off.
        item_conflict: What a re-announcement of a known item with *other* side features
            does (counted ``conflicting_item``, with a copy in the dead-letter topic):
            ``keep_first`` keeps the first features and params; ``replace_cold`` takes the
            new features and publishes re-generated cold-start params (a new version)
            while the item has no applied interaction, else keeps the first.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_value_bytes: int = Field(default=262_144, ge=1_024)
    max_string_bytes: int = Field(default=4_096, ge=16)
    max_support_row_bytes: int = Field(default=16_384, ge=256)
    max_ahead_of_wall_ms: int = Field(default=86_400_000, ge=0)
    max_ahead_of_clock_ms: int = Field(default=31_536_000_000, ge=0)
    item_conflict: Literal["keep_first", "replace_cold"] = "keep_first"


class Settings(BaseSettings):
    """Root settings every job shares: the cluster and the topics.

    Args:
        kafka: Connection to the cluster.
        topics: Topic names.
        schema_registry_url: Confluent Schema Registry; unset = the checked-in id
            manifest (``EMERG_SCHEMA_REGISTRY_URL``, also read by the codec).
    """

    model_config = SettingsConfigDict(
        env_prefix="EMERG_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    schema_registry_url: str | None = None


class WorkerSettings(Settings):
    """Settings of the warm-up worker (``emerg-stream worker``).

    Args:
        group_id: Consumer group; its members split the partitions.
        checkpoint: Model checkpoint (shared parameters, feature spec, model version).
        shadow_checkpoint: A second checkpoint of any method, the *shadow*: scored on
            the same clicks with the same prequential protocol and warmed up at the same
            thresholds, its predictions written to the predictions topic marked
            ``shadow`` and its AUC to the gauge with ``role="shadow"``; never published
            as item params. It must share the primary's split K, feature columns and old
            items (refused at start otherwise). Costs about one more model per batch
            (docs/DEPLOYMENT.md, Shadow method). ``None``: no shadow.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        batch_max_records: Most records per batch.
        batch_timeout_ms: Longest wait for the first record of a batch (how often an
            idle worker wakes up).
        batch_linger_ms: Once a batch has a record and nothing else is fetched yet,
            how long to wait for more before processing it. Records already fetched
            are taken at once, so under load a batch is whatever arrived while the
            previous one was processed (up to ``batch_max_records``): a record waits
            for at most one batch, not for a batch to fill.
        pending_max: Interactions held for items not announced yet, in total; beyond it
            the oldest go to the dead-letter topic.
        pending_max_age_ms: How long (in event time: the partition's largest event time
            read minus the interaction's own) an interaction waits for its item's
            announcement before it goes to the dead-letter topic.
        dedupe_window: Event ids remembered per item for de-duplication.
        inputs: Bounds on what producers may send (sizes, clocks, conflicts).
        warmup_backend: Where warm-up gradients come from: ``auto`` (the default: the
            compiled CPU kernel for EmerG on the CPU, 7-8x autograd on one core,
            built in seconds once per machine and model shape with the system C++
            compiler; autograd elsewhere, or where no compiler is found, with a
            warning), ``kernel`` (the kernel or a start-up error), ``autograd``, or
            ``compile`` (autograd through ``torch.compile``, about 2x autograd after tens
            of seconds of compilation per process), or ``kernel-bf16`` (the kernel with
            the joint attention's query and key products in bfloat16 on Intel AMX
            tiles, ~1.5x ``kernel``; a start-up error on a CPU without them; an offline
            table to compare against must be made with the same backend).
            Everything is built at start, before the worker joins its group
            (docs/BENCHMARKS.md, section 1).
        metrics_port: Prometheus port; ``None`` = no metrics server.
        metrics_host: Address the metrics server binds: the loopback by default,
            ``0.0.0.0`` in a container whose port is published or scraped from outside.
        auc_window: Labelled predictions in the sliding window of the prequential AUC
            gauge (``emerg_worker_prequential_auc``).
        session_timeout_ms: Consumer ``session.timeout.ms``. Keep it small (6000): the
            join wait of a group grows with it (about 23 s at librdkafka's 45000).
        heartbeat_interval_ms: Consumer ``heartbeat.interval.ms`` (below a third of the
            session timeout); a fast heartbeat makes rebalances fast.
        startup_retries: Attempts to reach the brokers at start before giving up.
        startup_backoff_ms: First wait between those attempts; doubles each time.
        startup_backoff_max_ms: Cap of that wait.
        processing_guarantee: ``at_least_once`` (the default: outputs, then changelog,
            then offsets, each durable before the next; a crash may repeat predictions
            and dead letters, never an update) or ``exactly_once`` (one Kafka
            transaction per batch holding its outputs, changelog and offsets;
            read-committed readers never see a duplicate or a zombie's output; needs a
            broker with transactions, refused at start otherwise, e.g. on the embedded
            Tansu broker). See docs/DEPLOYMENT.md for the cost.
        member_name: This member's stable name for its ``transactional.id``
            (``<group_id>.<member_name>``), e.g. the pod name of a StatefulSet, so a
            restarted member fences its predecessor at once; default
            ``<hostname>-<pid>`` (a predecessor's open transaction is then aborted after
            ``transaction_timeout_ms``). Only with ``exactly_once``.
        transaction_timeout_ms: ``transaction.timeout.ms`` of the transactional
            producer: how long a frozen member's open transaction can hold back
            read-committed readers before the broker aborts it.
    """

    group_id: str = "emerg-worker"
    checkpoint: Path = Path("runs/checkpoint.pt")
    shadow_checkpoint: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_max_records: int = Field(default=512, ge=1)
    batch_timeout_ms: int = Field(default=200, ge=0)
    batch_linger_ms: int = Field(default=10, ge=0)
    pending_max: int = Field(default=10_000, ge=0)
    pending_max_age_ms: int = Field(default=3_600_000, ge=0)
    dedupe_window: int = Field(default=1_000, ge=1)
    inputs: InputSettings = Field(default_factory=InputSettings)
    warmup_backend: WarmupBackend = "auto"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    auc_window: int = Field(default=10_000, ge=2)
    session_timeout_ms: int = Field(default=6_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    startup_retries: int = Field(default=10, ge=0)
    startup_backoff_ms: int = Field(default=500, ge=0)
    startup_backoff_max_ms: int = Field(default=10_000, ge=0)
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    member_name: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    transaction_timeout_ms: int = Field(default=10_000, ge=1_000)

    @model_validator(mode="after")
    def _check_worker(self) -> WorkerSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third "
                f"of session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.startup_backoff_max_ms < self.startup_backoff_ms:
            raise ValueError("startup_backoff_max_ms is below startup_backoff_ms")
        if "EMERG_WARMUP_COMPILE" in os.environ:  # retired: say so rather than ignore it
            raise ValueError(
                "EMERG_WARMUP_COMPILE was replaced by EMERG_WARMUP_BACKEND "
                "(auto | kernel | autograd | compile; compile is the old true)"
            )
        return self


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], overrides: Mapping[str, Any] | None = None) -> S:
    """Build settings from the environment (and explicit overrides), errors as ConfigError.

    Args:
        cls: The settings class, e.g. :class:`WorkerSettings`.
        overrides: Field values that win over the environment (from a command line),
            e.g. ``{"kafka": {"bootstrap_servers": "127.0.0.1:9092"}}``.

    Raises:
        ConfigError: Listing every invalid setting with its environment variable.
    """
    try:
        return cls(**dict(overrides or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = "__".join(str(p) for p in err["loc"]).upper()
            where = f"EMERG_{loc}" if loc else cls.__name__
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from exc
