"""Several worker processes in one job: one consumer-group member per CPU core.

A worker's micro-batch runs on one core (one torch thread is fastest for its small
tensors), and items are independent, so the way to use more cores is more members of
the consumer group: Kafka splits the partitions between them and every guarantee of a
single member (checkpoint order, restore from the changelog, rebalances) holds per
member unchanged. ``emerg-stream worker --members N`` starts N such processes and
supervises them:

- SIGTERM / SIGINT to the job is passed on as SIGTERM to every member; each finishes its
  batch, checkpoints and leaves the group; the job exits when all have (0 if all did).
- A member that fails (non-zero exit) stops the others the same way and the job exits
  with its code, so the orchestrator restarts the whole job as it would a single worker.
- A member that exits 0 on its own (``--exit-when-idle``) leaves the rest running.

Members are started with the ``spawn`` method (a fresh interpreter each: no torch or
librdkafka state is forked). Useful only up to the number of input partitions: a member
beyond it has nothing assigned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from emerg_stream.errors import ConfigError
from emerg_stream.threads import resolve_threads

log = structlog.get_logger(__name__)

#: How long members get to checkpoint and leave after SIGTERM before SIGKILL.
STOP_GRACE_S = 60.0


def resolve_members(value: str | int) -> int:
    """Members for ``--members``: a positive number, or ``auto``.

    ``auto`` is one member per CPU the job may use (:func:`emerg_stream.threads.resolve_threads`:
    the affinity, the cgroup CPU quota and ``EMERG_THREADS``, whichever is least), so a
    pod limited to 2 CPUs on a 64-core node runs 2 members, not 64.

    Raises:
        ConfigError: Not ``auto`` and not a positive integer.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return resolve_threads().threads
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--members takes a positive integer or 'auto', not {value!r}") from None
    if n < 1:
        raise ConfigError(f"--members must be at least 1, got {n}")
    return n


def member_path(path: Path | None, index: int, members: int) -> Path | None:
    """A per-member file name: ``stats.json`` -> ``stats.1.json`` when there are several."""
    if path is None or members == 1:
        return path
    return path.with_name(f"{path.stem}.{index}{path.suffix}")


def member_port(port: int | None, index: int) -> int | None:
    """Member ``index`` serves metrics on ``port + index`` (0 stays 0: any free port)."""
    if port is None or port == 0:
        return port
    return port + index


def _member_main(target: Callable[[Any, int], int], args: Any, index: int) -> None:
    """Entry point of a member process: logging as the parent's, then the worker."""
    import sys

    from emerg_stream.errors import EmergError
    from emerg_stream.logging import configure_logging

    configure_logging(
        json=True if getattr(args, "log_json", False) else None,
        level=getattr(args, "log_level", "INFO"),
    )
    structlog.contextvars.bind_contextvars(member=index)
    try:
        code = target(args, index)
    except EmergError as exc:
        structlog.get_logger("emerg_stream.cli").error("command_failed", error=str(exc))
        print(f"emerg-stream worker (member {index}): error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def supervise(target: Callable[[Any, int], int], args: Any, members: int) -> int:
    """Run ``target(args, index)`` in ``members`` processes until all end; the exit code.

    ``target`` must be a module-level function (it is pickled for ``spawn``).
    """
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = [
        ctx.Process(target=_member_main, args=(target, args, i), name=f"worker-member-{i}")
        for i in range(members)
    ]
    stopping = False

    def stop_all(reason: str) -> None:
        nonlocal stopping
        if not stopping:
            log.info("members_stopping", reason=reason)
        stopping = True
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_all(f"signal {signum}")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: int | None = None
    try:
        for p in procs:
            p.start()
        log.info("members_started", members=members, pids=[p.pid for p in procs])
        running = list(procs)
        deadline: float | None = None
        while running:
            wait([p.sentinel for p in running], timeout=0.5)
            for p in [p for p in running if not p.is_alive()]:
                running.remove(p)
                code = p.exitcode
                log.info("member_exited", member=procs.index(p), exit_code=code)
                if code != 0 and failed is None:
                    failed = code if code is not None and code > 0 else 1  # < 0: a signal
                    stop_all(f"member {procs.index(p)} exited with {code}")
            if stopping and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                for p in running:
                    log.warning("member_killed", member=procs.index(p), grace_s=STOP_GRACE_S)
                    p.kill()
                deadline = float("inf")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    return 0 if failed is None else failed
