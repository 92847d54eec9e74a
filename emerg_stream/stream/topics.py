"""Topic specs (``infra/topics.yaml``), idempotent creation, and the co-partitioning check.

The spec file names topics by *role* (the roles of :mod:`emerg_stream.topic_roles`);
:class:`~emerg_stream.config.TopicSettings` supplies the actual names, so one file serves
every environment::

    replication: 1
    topics:
      items:        {partitions: 4}
      item_params:  {partitions: 4, config: {cleanup.policy: compact}}
      ...

Roles the file omits get the built-in defaults (:data:`DEFAULT_PARTITIONS`,
:data:`DEFAULT_CONFIGS`, from the role table), which are what ``infra/topics.yaml`` ships
(it is generated from the same table).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not in admin's __all__
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from emerg_stream.config import TopicSettings
from emerg_stream.errors import ConfigError, TransientError
from emerg_stream.topic_roles import BY_ROLE, INPUT_ROLES, ROLES, TOPIC_ROLES

__all__ = [
    "DEFAULT_CONFIGS",
    "DEFAULT_PARTITIONS",
    "ROLES",
    "TopicSpec",
    "TopicStatus",
    "check_access",
    "check_copartitioned",
    "ensure_topics",
    "load_topic_specs",
    "topic_configs",
    "topic_partitions",
]

log = structlog.get_logger(__name__)

#: Partition counts when the spec file gives none (from the role table).
DEFAULT_PARTITIONS: Mapping[str, int] = {r.role: r.partitions for r in TOPIC_ROLES}
#: Topic configs when the spec file gives none: the compacted topics (from the role table).
DEFAULT_CONFIGS: Mapping[str, Mapping[str, str]] = {
    r.role: r.config for r in TOPIC_ROLES if r.config
}

TopicStatus = Literal["created", "exists"]

# Create-topic errors that retrying cannot fix.
_CONFIG_ERRORS = frozenset(
    {
        KafkaError.INVALID_PARTITIONS,
        KafkaError.INVALID_REPLICATION_FACTOR,
        KafkaError.INVALID_REPLICA_ASSIGNMENT,
        KafkaError.INVALID_CONFIG,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)


@dataclass(frozen=True)
class TopicSpec:
    """One topic to create.

    Args:
        role: One of :data:`ROLES`.
        name: Topic name.
        partitions: Partition count.
        replication: Replication factor.
        config: Topic configs, e.g. ``{"cleanup.policy": "compact"}``.
    """

    role: str
    name: str
    partitions: int
    replication: int
    config: Mapping[str, str] = field(default_factory=dict)


def load_topic_specs(
    source: str | Path | Mapping[str, Any] | None = None,
    names: TopicSettings | None = None,
) -> list[TopicSpec]:
    """Build one topic spec per role from a spec file (or its parsed form) and the names.

    Args:
        source: Path of a YAML spec file, its parsed mapping, or ``None`` for the
            built-in defaults.
        names: Topic names and overrides (default: :class:`TopicSettings` defaults).

    Returns:
        One spec per role, in :data:`ROLES` order.

    Raises:
        ConfigError: Unreadable file, unknown role, a non-positive count, or items and
            interactions with different partition counts.
    """
    names = TopicSettings() if names is None else names
    raw = _read_specs(source)
    topics = raw.get("topics") or {}
    if not isinstance(topics, Mapping):
        raise ConfigError("topic specs: 'topics' must map role -> spec")
    unknown = sorted(set(topics) - set(ROLES))
    if unknown:
        raise ConfigError(f"topic specs: unknown roles {unknown}; roles are {', '.join(ROLES)}")
    default_replication = _positive(raw.get("replication", 1), "replication")
    role_names = names.names()
    specs = []
    for role in ROLES:
        entry = topics.get(role) or {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"topic specs: {role} must be a mapping")
        partitions = _positive(entry.get("partitions", DEFAULT_PARTITIONS[role]), role)
        if names.partitions is not None and not BY_ROLE[role].fixed_partitions:
            partitions = names.partitions
        replication = _positive(entry.get("replication", default_replication), role)
        if names.replication is not None:
            replication = names.replication
        config = entry.get("config", DEFAULT_CONFIGS.get(role, {}))
        if not isinstance(config, Mapping):
            raise ConfigError(f"topic specs: {role}.config must be a mapping")
        specs.append(
            TopicSpec(
                role=role,
                name=role_names[role],
                partitions=partitions,
                replication=replication,
                config={str(k): str(v) for k, v in config.items()},
            )
        )
    by_role = {s.role: s for s in specs}
    first, *rest = INPUT_ROLES
    for other in rest:
        if by_role[first].partitions != by_role[other].partitions:
            raise ConfigError(
                f"topic specs: {first} has {by_role[first].partitions} partitions but {other} "
                f"has {by_role[other].partitions}; they must be equal (co-partitioned)"
            )
    return specs


def _read_specs(source: str | Path | Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The spec file's top-level mapping (``replication``, ``topics``), checked."""
    raw: Any
    if source is None:
        raw = {}
    elif isinstance(source, Mapping):
        raw = source
    else:
        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read topic specs {path}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"topic specs must be a mapping, got {type(raw).__name__}")
    unknown_keys = set(raw) - {"replication", "topics"}
    if unknown_keys:
        raise ConfigError(f"topic specs: unknown keys {sorted(unknown_keys)}")
    return raw


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"topic specs: {what}: expected a positive integer, got {value!r}")
    return value


def ensure_topics(
    admin_conf: Mapping[str, str],
    specs: str | Path | Mapping[str, Any] | Sequence[TopicSpec] | None = None,
    names: TopicSettings | None = None,
    *,
    timeout_s: float = 30.0,
) -> dict[str, TopicStatus]:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Idempotent: running it twice creates nothing the second time. An existing topic with
    a partition count other than its spec is logged (``topic_partitions_differ``), not
    changed; :func:`check_copartitioned` is what refuses to run on a bad layout.

    Args:
        admin_conf: librdkafka settings (``KafkaSettings.as_librdkafka()``).
        specs: Spec file path, parsed spec mapping, ready specs, or ``None`` (defaults).
        names: Topic names (ignored when ready specs are given).
        timeout_s: Deadline of each admin request.

    Returns:
        Topic name -> ``"created"`` or ``"exists"``.

    Raises:
        ConfigError: A spec the cluster rejects (bad count or config, no permission).
        TransientError: The cluster did not answer in time.
    """
    if specs is None or isinstance(specs, str | Path | Mapping):
        spec_list = load_topic_specs(specs, names)
    else:
        spec_list = list(specs)
    admin = AdminClient(dict(admin_conf))
    new = [NewTopic(s.name, s.partitions, s.replication, config=dict(s.config)) for s in spec_list]
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    status: dict[str, TopicStatus] = {}
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
            status[name] = "created"
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                status[name] = "exists"
            elif err.code() in _CONFIG_ERRORS:
                raise ConfigError(f"cannot create topic {name}: {err.str()}") from exc
            else:
                raise TransientError(f"cannot create topic {name}: {err.str()}") from exc
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError
            raise TransientError(f"creating topic {name} timed out after {timeout_s}s") from exc
    created = [n for n, st in status.items() if st == "created"]
    if created:  # usable once every broker knows it (see topic_partitions)
        visible = topic_partitions(admin, created, timeout_s=timeout_s, grace_s=timeout_s)
        late = sorted(set(created) - set(visible))
        if late:
            raise TransientError(f"created topics not visible after {timeout_s}s: {late}")
    existing = [s for s in spec_list if status.get(s.name) == "exists"]
    if existing:
        counts = topic_partitions(admin, [s.name for s in existing], timeout_s=timeout_s)
        for s in existing:
            if counts.get(s.name) != s.partitions:
                log.warning(
                    "topic_partitions_differ",
                    topic=s.name,
                    found=counts.get(s.name),
                    spec=s.partitions,
                )
    log.info(
        "topics_ensured",
        created=sorted(n for n, st in status.items() if st == "created"),
        existed=sorted(n for n, st in status.items() if st == "exists"),
    )
    return status


def topic_partitions(
    admin: AdminClient,
    topics: Sequence[str],
    *,
    timeout_s: float = 10.0,
    grace_s: float = 2.0,
) -> dict[str, int]:
    """Return topic -> partition count for the topics that exist (missing ones left out).

    A topic created a moment ago may be missing from a broker's metadata for a while
    (Apache Kafka answers CreateTopics once the controller committed it; each broker
    learns it from the metadata log afterwards), so topics absent or without leaders are
    asked for again for up to ``grace_s``: a topic that really is missing costs that
    long.

    Raises:
        TransientError: The cluster did not answer in time.
    """
    deadline = time.monotonic() + grace_s
    out: dict[str, int] = {}
    while True:
        try:
            md = admin.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            raise TransientError(f"cannot read cluster metadata: {exc.args[0].str()}") from exc
        for name in topics:
            tm = md.topics.get(name)
            if tm is None or tm.error is not None or not tm.partitions:
                continue
            if all(pm.leader >= 0 for pm in tm.partitions.values()):
                out[name] = len(tm.partitions)
        if len(out) == len(set(topics)) or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def topic_configs(
    admin: AdminClient, topics: Sequence[str], *, timeout_s: float = 10.0
) -> dict[str, dict[str, str]]:
    """Return topic -> {config name: value} as the cluster describes it.

    Some brokers (Tansu) report only the configs set on the topic, not the defaults.

    Raises:
        TransientError: The cluster did not answer in time or refused the request.
    """
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    futures = admin.describe_configs(resources, request_timeout=timeout_s)
    out: dict[str, dict[str, str]] = {}
    for res, fut in futures.items():
        try:
            entries = fut.result(timeout=timeout_s)
        except (KafkaException, TimeoutError) as exc:
            raise TransientError(f"cannot describe configs of {res.name}: {exc}") from exc
        out[res.name] = {k: v.value for k, v in entries.items() if v.value is not None}
    return out


def check_access(
    admin: AdminClient,
    reads: Sequence[str],
    writes: Sequence[str],
    *,
    who: str = "this client",
    timeout_s: float = 10.0,
) -> None:
    """Refuse to start without READ on ``reads`` or WRITE on ``writes`` (one line).

    Asks the broker which operations the principal may perform on each topic
    (``DescribeTopics`` with authorized operations, KIP-430), so a missing ACL is named
    at start instead of failing the first produce later. A broker that does not report
    them (the embedded Tansu broker) passes: the produce then fails as before.

    Args:
        admin: An admin client with the job's credentials.
        reads: Topics the job consumes.
        writes: Topics the job produces to.
        who: The principal, for the message (e.g. ``user 'emerg-ranker'``); no secret.
        timeout_s: Deadline of the request.

    Raises:
        ConfigError: An operation is not allowed; the message names topic and operation.
    """
    need: dict[str, set[str]] = {}
    for t in reads:
        need.setdefault(t, set()).add("READ")
    for t in writes:
        need.setdefault(t, set()).add("WRITE")
    if not need:
        return
    futures = admin.describe_topics(
        TopicCollection(sorted(need)),
        include_authorized_operations=True,
        request_timeout=timeout_s,
    )
    refused: list[str] = []
    try:
        _authorized(futures, need, refused, timeout_s)
    finally:
        admin.poll(0.1)  # serve the request's last event (else librdkafka logs it at exit)
    if refused:
        raise ConfigError(
            f"{who} is not authorized for {', '.join(refused)}; grant it with an ACL "
            f"(kafka-acls.sh --add --allow-principal User:<name> --operation <op> --topic <t>)"
        )


def _authorized(
    futures: Mapping[str, Any], need: Mapping[str, set[str]], refused: list[str], timeout_s: float
) -> None:
    """Append to ``refused`` what the DescribeTopics answers do not allow."""
    for topic, fut in sorted(futures.items()):
        try:
            desc = fut.result(timeout=timeout_s)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                refused.append(f"DESCRIBE on topic {topic!r}")
            continue  # missing topics are reported by the caller's own checks
        except TimeoutError:
            continue
        ops = getattr(desc, "authorized_operations", None)
        if not ops:
            continue  # not reported by this broker
        allowed = {op.name for op in ops}
        if "ALL" in allowed:
            continue
        refused += [f"{op} on topic {topic!r}" for op in sorted(need[topic] - allowed)]


def check_copartitioned(
    admin: AdminClient,
    items_topic: str,
    interactions_topic: str,
    *,
    timeout_s: float = 10.0,
) -> int:
    """Refuse to go on unless items and interactions have the same partition count.

    Both are keyed by item id; with equal counts (and the default partitioner) an
    item's announcement and its interactions land in the same partition number, so the
    consumer that owns an item sees both.

    Returns:
        The common partition count.

    Raises:
        ConfigError: A topic is missing, or the counts differ; the message says how to fix it.
        TransientError: The cluster did not answer in time.
    """
    counts = topic_partitions(admin, [items_topic, interactions_topic], timeout_s=timeout_s)
    missing = [t for t in (items_topic, interactions_topic) if t not in counts]
    if missing:
        raise ConfigError(
            f"topic(s) {', '.join(missing)} do not exist; create them with "
            f"`emerg-stream topics create` (infra/topics.yaml)"
        )
    n_items, n_inter = counts[items_topic], counts[interactions_topic]
    if n_items != n_inter:
        bigger = max(n_items, n_inter)
        smaller_topic = items_topic if n_items < n_inter else interactions_topic
        raise ConfigError(
            f"items topic {items_topic!r} has {n_items} partitions but interactions topic "
            f"{interactions_topic!r} has {n_inter}; they must be co-partitioned (same count, "
            f"both keyed by item id). Fix: while both are empty, raise {smaller_topic!r} to "
            f"{bigger} (kafka-topics.sh --alter --topic {smaller_topic} --partitions {bigger}); "
            f"otherwise delete both and recreate them with `emerg-stream topics create`, "
            f"then replay the data"
        )
    return n_items
