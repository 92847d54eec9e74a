"""``emerg-stream demo``: the whole pipeline on ml-100k in one command, checked against offline.

Starts the embedded broker, trains EmerG (or reuses the cached checkpoint with
``--reuse``), runs the worker, replays the log, waits for the worker to catch up,
and prints the per-phase table of the stream next to the offline one with the counts.
Ctrl-C stops everything cleanly (exit status 130). See :mod:`emerg_stream.demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emerg_stream.devices import DEVICES
from emerg_stream.jobs.replay import parse_speed

HELP = "End-to-end demo on ml-100k: train, stream through the worker, compare with offline."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k", help="dataset (default ml-100k)")
    parser.add_argument("--data-dir", default=None, help="dataset folder ($EMERG_DATA_DIR)")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(".cache/demo"), help="cache of checkpoints"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the cached checkpoint of the same config"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="max pretraining epochs")
    parser.add_argument("--meta-epochs", type=int, default=1, help="max meta-training epochs")
    parser.add_argument("--partitions", type=int, default=2, help="partitions per topic")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--worker-timeout", type=float, default=900.0, help="longest wait for the worker, s"
    )
    parser.add_argument(
        "--speed",
        type=parse_speed,
        default=None,
        help="replay speed: 'max' (default) or a factor (event-time gaps divided by it)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    import signal
    import sys
    import threading
    import time
    from dataclasses import asdict
    from types import FrameType

    from emerg_stream.demo import DemoOptions, StoppedError, check_options, report, run_demo

    opts = DemoOptions(
        dataset=args.dataset,
        data_dir=args.data_dir,
        work_dir=args.work_dir,
        reuse=args.reuse,
        pretrain_epochs=args.pretrain_epochs,
        meta_epochs=args.meta_epochs,
        partitions=args.partitions,
        worker_timeout_s=args.worker_timeout,
        device=args.device,
        progress=not args.no_progress,
        speed=args.speed,
    )
    check_options(opts)
    stop = threading.Event()
    stage = ["start"]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stage[0] != "stream" or stop.is_set():
            raise KeyboardInterrupt  # training (pure torch), or a second Ctrl-C
        stop.set()  # Kafka clients run: request a stop, run_demo unwinds cleanly

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        result = run_demo(opts, stop, on_stage=lambda name: stage.__setitem__(0, name))
    except (KeyboardInterrupt, StoppedError):
        # run_demo's context managers have stopped the worker and the broker
        print("demo stopped: worker and broker shut down", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    total = round(time.perf_counter() - t0, 1)
    print(report(result), end="")
    print(f"demo wall time: {total} s")
    if args.json is not None:
        args.json.write_text(json.dumps({**asdict(result), "wall_s": total}, indent=2) + "\n")
    return 0
