"""``emerg-stream worker``: the warm-up worker, one or more consumer-group members.

Settings come from the environment (``EMERG_KAFKA__*``, ``EMERG_TOPICS__*``,
``EMERG_GROUP_ID``, ``EMERG_BATCH_MAX_RECORDS`` ...; see ``WorkerSettings``); the flags
below override them. SIGTERM / SIGINT finish the current batch, checkpoint and close
(exit 0). See :mod:`emerg_stream.stream.worker` for the loop and its checkpoint order, and
:mod:`emerg_stream.stream.members` for ``--members`` (one process per core).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from emerg_stream.devices import DEVICES

if TYPE_CHECKING:
    from emerg_stream.config import WorkerSettings

HELP = "Run the warm-up worker: items + interactions -> item params, predictions, changelog."
#: The supervisor of several members computes nothing: each member applies its own share
#: of the threads (``run_member``), so the command line need not import torch here.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint directory (default: EMERG_CHECKPOINT, else runs/checkpoint.pt)",
    )
    parser.add_argument(
        "--shadow-checkpoint",
        type=Path,
        default=None,
        help="a second checkpoint (any method) scored on the same clicks beside the "
        "primary, predictions marked shadow, never published as params (default: "
        "EMERG_SHADOW_CHECKPOINT, else none; docs/DEPLOYMENT.md, Shadow method)",
    )
    parser.add_argument("--device", choices=DEVICES, default=None)
    parser.add_argument("--group", default=None, help="consumer group (EMERG_GROUP_ID)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port")
    parser.add_argument("--bootstrap", default=None, help="bootstrap servers (overrides settings)")
    parser.add_argument(
        "--stats-file", type=Path, default=None, help="JSON counters, rewritten per checkpoint"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="most intra-op CPU threads per member (default 1: micro-batch tensors are "
        "small; more cores are used by more members). Never more than the member's share "
        "of the CPUs the job may use: affinity, cgroup quota, EMERG_THREADS",
    )
    parser.add_argument(
        "--members",
        default="1",
        help="worker processes in this job, each a member of the group with its own "
        "partitions and one core: a number, or 'auto' (one per CPU the job may use: its "
        "affinity, its cgroup CPU quota and EMERG_THREADS, whichever is least). With "
        "several, member i serves metrics on --metrics-port + i and writes its stats to "
        "STATS.i.json (default 1)",
    )
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop (checkpointed) after this long without records",
    )


def run(args: argparse.Namespace) -> int:
    from emerg_stream.stream.members import resolve_members, supervise

    members = resolve_members(args.members)
    if members == 1:
        return run_member(args, 0)
    load_worker_settings(args)  # bad settings fail here, once, not in every member
    return supervise(run_member, args, members)


def load_worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """``WorkerSettings`` from the environment with this job's flags on top."""
    from typing import Any

    from emerg_stream.config import WorkerSettings, load_settings

    overrides: dict[str, Any] = {}
    for key, value in (
        ("checkpoint", args.checkpoint),
        ("shadow_checkpoint", getattr(args, "shadow_checkpoint", None)),
        ("device", args.device),
        ("group_id", args.group),
        ("metrics_port", args.metrics_port),
    ):
        if value is not None:
            overrides[key] = value
    if args.bootstrap:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    return load_settings(WorkerSettings, overrides)


def run_member(args: argparse.Namespace, index: int) -> int:
    """One worker (member ``index`` of this job's members) until stopped."""
    import signal
    from types import FrameType

    import structlog

    from emerg_stream.serving.handler import TorchWarmupHandler
    from emerg_stream.stream.members import member_path, member_port, resolve_members
    from emerg_stream.stream.worker import Worker

    members = resolve_members(args.members)
    settings = load_worker_settings(args)
    if settings.metrics_port is not None and members > 1:
        settings = settings.model_copy(
            update={"metrics_port": member_port(settings.metrics_port, index)}
        )
    from emerg_stream.threads import configure_threads

    configure_threads(processes=members, per_process_max=args.torch_threads)
    handler = TorchWarmupHandler.from_checkpoint(
        settings.checkpoint, settings.device, warmup_backend=settings.warmup_backend
    )
    shadow = None
    if settings.shadow_checkpoint is not None:
        shadow = TorchWarmupHandler.from_checkpoint(
            settings.shadow_checkpoint, settings.device, warmup_backend=settings.warmup_backend
        )
    worker = Worker(
        settings,
        handler,
        stats_path=member_path(args.stats_file, index, members),
        exit_when_idle_s=args.exit_when_idle,
        shadow=shadow,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        structlog.get_logger("jobs.worker").info("stop_requested", signal=signum)
        worker.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.run()
    finally:
        for sig, handler_ in previous.items():
            signal.signal(sig, handler_)
    return 0
