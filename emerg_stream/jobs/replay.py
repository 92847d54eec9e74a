"""``emerg-stream replay``: a historical log -> ItemEvents and Interactions, test rows left out.

Event-time order (ties in file order), every item announced right before its first
interaction, deterministic event ids ``<dataset>:<row>`` (a second run is de-duplicated
by the worker). Topics and cluster come from the settings (``EMERG_TOPICS__*``,
``EMERG_KAFKA__*``). Ctrl-C stops early; what was sent is flushed (exit status 130).
See :mod:`emerg_stream.stream.replay`.
"""

from __future__ import annotations

import argparse

HELP = "Replay a dataset's log into the items/interactions topics (held-out test rows left out)."
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def parse_speed(text: str) -> float | None:
    """``--speed``: ``max`` (None) or a positive factor."""
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--speed must be 'max' or a number, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--speed must be positive, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="preset (ml-100k, ...) or dataset YAML")
    parser.add_argument(
        "--data-dir", default=None, help="dataset folder (default: $EMERG_DATA_DIR)"
    )
    parser.add_argument(
        "--speed",
        type=parse_speed,
        default=None,
        help="'max' (default) or a factor: event-time gaps are divided by it",
    )
    parser.add_argument("--limit", type=int, default=None, help="stop after N interactions")
    parser.add_argument(
        "--time-unit",
        default="s",
        choices=["s", "ms", "us", "ns"],
        help="unit of the log's integer time (default s; MovieLens and Taobao are seconds)",
    )
    parser.add_argument("--bootstrap", default=None, help="bootstrap servers (overrides settings)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading
    from types import FrameType

    from emerg_stream.config import Settings, load_settings
    from emerg_stream.data import load_dataset
    from emerg_stream.stream.replay import replay

    overrides = {"kafka": {"bootstrap_servers": args.bootstrap}} if args.bootstrap else None
    settings = load_settings(Settings, overrides)
    ilog = load_dataset(args.dataset, args.data_dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        counts = replay(
            ilog,
            settings.kafka.as_librdkafka(),
            settings.topics.items,
            settings.topics.interactions,
            speed=args.speed,
            limit=args.limit,
            time_unit=args.time_unit,
            progress=not args.no_progress,
            stop=stop,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(
        f"replayed {ilog.name}: {counts.items} item events -> {settings.topics.items}, "
        f"{counts.interactions} interactions -> {settings.topics.interactions}, "
        f"{counts.test_rows_left_out} held-out test rows left out ({counts.seconds} s)"
    )
    return 130 if stop.is_set() else 0
