"""Fault injection for the crash tests: kill the worker at a named point of its loop.

**A test aid, not a feature.** Only the worker reads :data:`FAULT_ENV`
(``EMERG_FAULT_INJECT``), once at construction; unset (the default) every hook is a
no-op. The value is ``POINT:N`` (several separated by commas): the process ends with
``os._exit(137)`` (no flush, no checkpoint, no leave-group: what ``kill -9`` does) the
``N``-th time it reaches ``POINT``. The points, in the order of the checkpoint
(see :mod:`emerg_stream.stream.commit`):

``mid_update``
    inside a batched warm-up update: the inner loop has run, the new params are not yet
    stored, published or checkpointed;
``after_changelog``
    the changelog (item states + partition marks) is produced and flushed, the input
    offsets are not committed;
``after_commit``
    the offsets are committed, the stats file is not yet rewritten;
``during_restore``
    on assign, the changelog has been read back, the partitions' state is not yet
    installed and no record has been fetched.
"""

from __future__ import annotations

import os
import sys

from emerg_stream.errors import ConfigError

__all__ = ["FAULT_ENV", "POINTS", "FaultInjector"]

#: The environment variable the worker reads (tests only).
FAULT_ENV = "EMERG_FAULT_INJECT"
POINTS: tuple[str, ...] = ("mid_update", "after_changelog", "after_commit", "during_restore")
#: Exit status of an injected crash (that of a process killed by SIGKILL in a shell).
CRASH_STATUS = 137


class FaultInjector:
    """Counts the points reached and ends the process at the armed one.

    Args:
        spec: ``POINT:N[,POINT:N...]``; empty or ``None`` arms nothing.

    Raises:
        ConfigError: An unknown point or a count that is not a positive integer.
    """

    def __init__(self, spec: str | None) -> None:
        self.armed: dict[str, int] = {}
        self.reached: dict[str, int] = dict.fromkeys(POINTS, 0)
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            point, _, n = part.strip().partition(":")
            if point not in POINTS or not n.isdigit() or int(n) < 1:
                raise ConfigError(
                    f"{FAULT_ENV}={spec!r}: expected POINT:N with POINT one of "
                    f"{', '.join(POINTS)} and N >= 1"
                )
            self.armed[point] = int(n)

    @classmethod
    def from_env(cls) -> FaultInjector:
        """The injector :data:`FAULT_ENV` asks for (nothing armed when unset)."""
        return cls(os.environ.get(FAULT_ENV))

    def hit(self, point: str) -> None:
        """Count ``point``; exit the process at once if this is the armed occurrence."""
        self.reached[point] = self.reached.get(point, 0) + 1
        if self.armed.get(point) == self.reached[point]:
            sys.stderr.write(f"fault injected: {point}:{self.reached[point]}\n")
            sys.stderr.flush()
            os._exit(CRASH_STATUS)
