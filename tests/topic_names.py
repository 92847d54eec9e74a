"""Fresh topic names for one test: one per role of the topic table, on the test broker."""

from __future__ import annotations

from collections.abc import Callable

from emerg_stream.config import TopicSettings
from emerg_stream.stream.topics import ensure_topics, load_topic_specs
from emerg_stream.topic_roles import ROLES


def topic_names(unique_name: Callable[[str], str], partitions: int = 2) -> TopicSettings:
    """A unique name for every role (nothing is created)."""
    return TopicSettings(**{role: unique_name(role) for role in ROLES}, partitions=partitions)


def fresh_topics(
    kafka_conf: dict[str, str], unique_name: Callable[[str], str], partitions: int = 2
) -> TopicSettings:
    """:func:`topic_names`, created with their default specs."""
    names = topic_names(unique_name, partitions)
    ensure_topics(kafka_conf, load_topic_specs(None, names))
    return names
