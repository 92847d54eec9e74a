"""``emerg-stream worker``: the warm-up worker, one consumer-group member.

Settings come from the environment (``EMERG_KAFKA__*``, ``EMERG_TOPICS__*``,
``EMERG_GROUP_ID``, ``EMERG_BATCH_MAX_RECORDS`` ...; see ``WorkerSettings``); the flags
below override them. SIGTERM / SIGINT finish the current batch, checkpoint and close
(exit 0). See :mod:`emerg_stream.stream.worker` for the loop and its checkpoint order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Run the warm-up worker: items + interactions -> item params, predictions, changelog."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint directory (default: EMERG_CHECKPOINT, else runs/checkpoint.pt)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
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
        help="intra-op CPU threads (default 1: micro-batch tensors are small, and spinning "
        "OpenMP threads slow them down several times on a busy machine)",
    )
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop (checkpointed) after this long without records",
    )


def run(args: argparse.Namespace) -> int:
    import signal
    from types import FrameType
    from typing import Any

    import structlog

    from emerg_stream.config import WorkerSettings, load_settings
    from emerg_stream.serving.handler import TorchWarmupHandler
    from emerg_stream.stream.worker import Worker

    overrides: dict[str, Any] = {}
    for key, value in (
        ("checkpoint", args.checkpoint),
        ("device", args.device),
        ("group_id", args.group),
        ("metrics_port", args.metrics_port),
    ):
        if value is not None:
            overrides[key] = value
    if args.bootstrap:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    settings = load_settings(WorkerSettings, overrides)
    import torch

    torch.set_num_threads(max(1, args.torch_threads))
    handler = TorchWarmupHandler.from_checkpoint(settings.checkpoint, settings.device)
    worker = Worker(
        settings, handler, stats_path=args.stats_file, exit_when_idle_s=args.exit_when_idle
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
