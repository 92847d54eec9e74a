"""``emerg-stream broker``: run the embedded Tansu broker on 127.0.0.1 until stopped.

Prints the bootstrap address (one line, stdout) once the broker answers, so scripts can
do ``BOOTSTRAP=$(emerg-stream broker --port 9092 & ...)`` or read the first line; logs go
to stderr. Ctrl-C or SIGTERM stops the broker cleanly (exit status 0). Memory storage:
every topic is lost when it stops.
"""

from __future__ import annotations

import argparse

HELP = "Run the embedded Kafka-compatible broker (Tansu, memory only) on 127.0.0.1."
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=None, help="TCP port on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--authentication",
        action="store_true",
        help="require SASL (Tansu --authentication); with memory storage no user can exist, "
        "so every client is refused: for testing client failures only",
    )
    parser.add_argument(
        "--topics",
        metavar="YAML",
        default=None,
        help="also create the topics of this spec file (e.g. infra/topics.yaml) once up",
    )


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    import threading
    from types import FrameType

    import structlog

    from emerg_stream.config import Settings, load_settings
    from emerg_stream.stream.broker import EmbeddedBroker

    log = structlog.get_logger("jobs.broker")
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port=args.port, authentication=args.authentication) as broker:
            if args.topics:
                from emerg_stream.stream.topics import ensure_topics

                settings = load_settings(Settings)
                ensure_topics({"bootstrap.servers": broker.bootstrap}, args.topics, settings.topics)
            print(broker.bootstrap, flush=True)
            while not stop.wait(0.5):
                if not broker.running:
                    log.error("broker_died", log_tail=broker.log_tail())
                    print(f"broker exited unexpectedly:\n{broker.log_tail()}", file=sys.stderr)
                    return 1
            log.info("broker_stopping", signal=received[0] if received else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
