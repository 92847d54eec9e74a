"""Who may do what on the reference broker: its SCRAM users and their ACLs.

:class:`~emerg_stream.stream.apache_kafka.ApacheKafka` creates the users of
:data:`PRINCIPALS` at format time and the ACLs of :func:`acl_bindings` once the node is
up. The worker may read, write and create topics, consumer groups and transactional ids;
the ranker only reads; the admin is a super user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confluent_kafka.admin import AclBinding  # type: ignore[attr-defined]

__all__ = ["PRINCIPALS", "Principal", "acl_bindings"]


@dataclass(frozen=True)
class Principal:
    """A SCRAM user of the test broker and what its ACLs allow.

    Args:
        name: User name (principal ``User:<name>``).
        role: ``worker`` (read/write/create), ``ranker`` (read-only) or ``admin`` (super
            user).
    """

    name: str
    role: str


#: The SCRAM-SHA-512 users created at format time.
PRINCIPALS: tuple[Principal, ...] = (
    Principal("emerg-worker", "worker"),
    Principal("emerg-ranker", "ranker"),
    Principal("emerg-admin", "admin"),
)


def acl_bindings() -> list[AclBinding]:
    """The ACLs of :data:`PRINCIPALS` (the admin is a super user and needs none)."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not in __all__
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    grants: dict[str, list[tuple[ResourceType, str, AclOperation]]] = {
        "worker": [
            (ResourceType.TOPIC, "*", AclOperation.ALL),
            (ResourceType.GROUP, "*", AclOperation.ALL),
            (ResourceType.TRANSACTIONAL_ID, "*", AclOperation.ALL),
            (ResourceType.BROKER, "kafka-cluster", AclOperation.IDEMPOTENT_WRITE),
            (ResourceType.BROKER, "kafka-cluster", AclOperation.CREATE),
            (ResourceType.BROKER, "kafka-cluster", AclOperation.DESCRIBE),
        ],
        "ranker": [
            (ResourceType.TOPIC, "*", AclOperation.READ),
            (ResourceType.TOPIC, "*", AclOperation.DESCRIBE),
            (ResourceType.TOPIC, "*", AclOperation.DESCRIBE_CONFIGS),
            (ResourceType.GROUP, "*", AclOperation.READ),
            (ResourceType.GROUP, "*", AclOperation.DESCRIBE),
        ],
    }
    out: list[AclBinding] = []
    for p in PRINCIPALS:
        for rtype, name, op in grants.get(p.role, []):
            out.append(
                AclBinding(
                    rtype,
                    name,
                    ResourcePatternType.LITERAL,
                    f"User:{p.name}",
                    "*",
                    op,
                    AclPermissionType.ALLOW,
                )
            )
    return out
