"""The topic roles of DESIGN.md §4: the one table every room reads.

Each :class:`TopicRole` binds a role (``items``, ``item_params``, ...) to its default
topic name, the Avro record it carries, whether the worker reads or writes it, and how
``emerg-stream topics create`` makes it. Derived from this table, never written out again:

* :class:`~emerg_stream.config.TopicSettings` (one ``EMERG_TOPICS__<ROLE>`` field per role);
* :data:`emerg_stream.stream.topics.ROLES` and its default partitions and configs;
* the worker's start-up check (the topics it must read and write);
* :data:`emerg_stream.io.schemas.RECORD_NAMES`;
* ``infra/topics.yaml`` and the topic names of ``infra/k8s/configmap.yaml``
  (:func:`write_infra`, run by ``make infra``; a test checks the committed files).

Adding an output topic: one row here, the code that produces to it, then ``make infra``
and ``make config-doc`` regenerate the infra files and the settings reference.
Standard library only: every layer may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "INPUT_ROLES",
    "RECORD_NAMES",
    "ROLES",
    "TOPIC_ROLES",
    "TopicRole",
    "read_roles",
    "render_configmap_topics",
    "render_topics_yaml",
    "update_configmap",
    "write_infra",
    "written_roles",
]


@dataclass(frozen=True)
class TopicRole:
    """One topic role.

    Args:
        role: Role name (the ``EMERG_TOPICS__<ROLE>`` setting, the key in topic specs).
        default_name: Topic name when the setting is not given.
        record: Avro record of its values (``schemas/<record>.avsc``).
        doc: One line for the settings reference.
        partitions: Partition count when the spec file gives none.
        config: Topic configs when the spec file gives none (compaction).
        input: The worker consumes it in its batches (keyed by item id, co-partitioned).
        worker_reads: The worker reads it (its inputs, and the changelog on restore).
        worker_writes: The worker produces to it.
        fixed_partitions: ``EMERG_TOPICS__PARTITIONS`` leaves its count alone.
        comment: Comment of its block in ``infra/topics.yaml``.
    """

    role: str
    default_name: str
    record: str
    doc: str
    partitions: int = 4
    config: Mapping[str, str] = field(default_factory=dict)
    input: bool = False
    worker_reads: bool = False
    worker_writes: bool = False
    fixed_partitions: bool = False
    comment: str = ""


_COMPACT = {"cleanup.policy": "compact"}

#: Every role, in creation order.
TOPIC_ROLES: tuple[TopicRole, ...] = (
    TopicRole(
        "items",
        "emerg.items",
        "ItemEvent",
        "ItemEvent topic (key = item id).",
        input=True,
        worker_reads=True,
    ),
    TopicRole(
        "interactions",
        "emerg.interactions",
        "Interaction",
        "Interaction topic; co-partitioned with ``items``.",
        input=True,
        worker_reads=True,
        comment="= items",
    ),
    TopicRole(
        "item_params",
        "emerg.item-params",
        "ItemParams",
        "ItemParams topic (compacted).",
        config=_COMPACT,
        worker_writes=True,
        comment="rankers read the latest params per item",
    ),
    TopicRole(
        "predictions",
        "emerg.predictions",
        "Prediction",
        "Prediction topic.",
        worker_writes=True,
    ),
    TopicRole(
        "dead_letter",
        "emerg.dead-letter",
        "DeadLetter",
        "DeadLetter topic.",
        partitions=1,
        worker_writes=True,
        fixed_partitions=True,
    ),
    TopicRole(
        "changelog",
        "emerg.state-changelog",
        "ItemState",
        "ItemState changelog (compacted).",
        config=_COMPACT,
        worker_reads=True,
        worker_writes=True,
        comment="the latest state per item restores a worker",
    ),
)

#: Role names, in creation order.
ROLES: tuple[str, ...] = tuple(r.role for r in TOPIC_ROLES)
#: The roles the worker consumes in its batches, in order.
INPUT_ROLES: tuple[str, ...] = tuple(r.role for r in TOPIC_ROLES if r.input)
#: Every record type on the wire, one ``schemas/<Name>.avsc`` each.
RECORD_NAMES: tuple[str, ...] = tuple(dict.fromkeys(r.record for r in TOPIC_ROLES))
BY_ROLE: Mapping[str, TopicRole] = {r.role: r for r in TOPIC_ROLES}


def read_roles() -> tuple[str, ...]:
    """Roles the worker reads (it needs read access to each)."""
    return tuple(r.role for r in TOPIC_ROLES if r.worker_reads)


def written_roles() -> tuple[str, ...]:
    """Roles the worker produces to (each must exist before it starts)."""
    return tuple(r.role for r in TOPIC_ROLES if r.worker_writes)


_YAML_HEAD = """\
# The topics of emerg-stream (DESIGN.md §4), by role.
# Generated from the table in emerg_stream/topic_roles.py by `make infra`: edit the table.
#
# Names are NOT set here: they come from TopicSettings (EMERG_TOPICS__<ROLE>=..., defaults
# in docs/CONFIGURATION.md), so one file serves every environment. EMERG_TOPICS__PARTITIONS /
# EMERG_TOPICS__REPLICATION override the counts below (all but {fixed} for partitions).
#
# Records are keyed by item id. {inputs} MUST have the same partition count
# (co-partitioned): the worker refuses to start otherwise. Kafka can only add partitions,
# and adding them moves keys, so size them once, before the first record.
#
# Apply with:  emerg-stream topics create [--config infra/topics.yaml]   (idempotent)

replication: 1           # default replication factor; a production cluster wants 3

topics:
"""


def render_topics_yaml() -> str:
    """The text of ``infra/topics.yaml``: every role's partitions and configs."""
    fixed = " and ".join(r.role for r in TOPIC_ROLES if r.fixed_partitions)
    lines = [_YAML_HEAD.format(fixed=fixed, inputs=" and ".join(INPUT_ROLES))]
    for r in TOPIC_ROLES:
        lines.append(f"  {r.role}:" + (f"    # {r.comment}" if r.comment else "") + "\n")
        lines.append(f"    partitions: {r.partitions}\n")
        if r.config:
            lines.append("    config:\n")
            lines += [f"      {key}: {value}\n" for key, value in r.config.items()]
    return "".join(lines)


def render_configmap_topics(prefix: str = "prod.") -> str:
    """The topic-name lines of ``infra/k8s/configmap.yaml`` (one per role)."""
    return "".join(
        f'  EMERG_TOPICS__{r.role.upper()}: "{prefix}{r.default_name}"\n' for r in TOPIC_ROLES
    )


def update_configmap(text: str, prefix: str = "prod.") -> str:
    """``infra/k8s/configmap.yaml`` with its topic-name lines replaced by one per role.

    The lines ``  EMERG_TOPICS__<ROLE>: ...`` of the roles (not the size overrides) are
    one block; it is replaced where it starts.

    Raises:
        ValueError: The text holds no such line.
    """
    overrides = {"  EMERG_TOPICS__PARTITIONS:", "  EMERG_TOPICS__REPLICATION:"}
    lines = text.splitlines(keepends=True)
    at = [
        i
        for i, line in enumerate(lines)
        if line.startswith("  EMERG_TOPICS__") and not any(line.startswith(o) for o in overrides)
    ]
    if not at:
        raise ValueError("no EMERG_TOPICS__<ROLE> line to replace")
    kept = [line for i, line in enumerate(lines) if i not in set(at)]
    start = at[0]
    return "".join(kept[:start]) + render_configmap_topics(prefix) + "".join(kept[start:])


def write_infra(root: Path) -> list[Path]:
    """Regenerate ``infra/topics.yaml`` and the topic names of the k8s ConfigMap under ``root``.

    Returns:
        The files written.
    """
    spec = root / "infra" / "topics.yaml"
    spec.write_text(render_topics_yaml(), encoding="utf-8")
    configmap = root / "infra" / "k8s" / "configmap.yaml"
    configmap.write_text(update_configmap(configmap.read_text(encoding="utf-8")), encoding="utf-8")
    return [spec, configmap]


if __name__ == "__main__":  # pragma: no cover - `make infra`
    import sys

    for written in write_infra(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(f"wrote {written}")
