"""The project's exception hierarchy.

Every error the project raises on purpose derives from :class:`EmergError`, so a job's
entry point can tell a known failure (one clear line, non-zero exit) from a bug.
"""

from __future__ import annotations


class EmergError(Exception):
    """Root of every error raised on purpose by emerg-stream."""


class ConfigError(EmergError):
    """Settings, a dataset YAML or a command line that cannot work as given."""


class DataError(EmergError):
    """A dataset file is missing, unreadable or holds rows that cannot be parsed."""


class SchemaError(EmergError):
    """A record does not match its Avro schema, or a schema change is incompatible."""


class ModelError(EmergError):
    """A checkpoint or parameters that do not fit the model (version, shape, tampering)."""


class TransientError(EmergError):
    """A failure worth retrying with backoff (broker unreachable, request timed out)."""


class PoisonMessageError(EmergError):
    """A record that can never be processed; it goes to the dead-letter topic.

    Args:
        kind: Short machine-readable reason, e.g. ``"decode"`` or ``"unknown_item"``.
        message: Human-readable explanation.
        topic: Source topic of the record.
        partition: Source partition.
        offset: Source offset.
        raw: The record's raw value bytes, kept so the record can be replayed after a fix.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.raw = raw
