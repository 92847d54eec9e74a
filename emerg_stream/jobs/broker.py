"""``emerg-stream broker``: run a broker on 127.0.0.1 until stopped.

By default the embedded Tansu broker (memory storage: every topic is lost when it
stops). With ``--kafka``, Apache Kafka (KRaft, one node; jars fetched with Maven once,
see :mod:`emerg_stream.stream.apache_kafka`): a PLAINTEXT listener (super user, loopback
only) and a SASL_SSL one (SCRAM-SHA-512, the run's own CA).

Prints the PLAINTEXT bootstrap address as the first stdout line once the broker answers,
so scripts can read the first line; with ``--kafka`` more ``key value`` lines follow
(``sasl_ssl``, ``ca``, and ``env.<user>``: a 0600 file of ``EMERG_KAFKA__*`` settings
holding that user's password; passwords are never printed). Logs go to stderr. Ctrl-C or
SIGTERM stops the broker cleanly (exit status 0).
"""

from __future__ import annotations

import argparse

HELP = "Run a broker on 127.0.0.1: embedded Tansu (memory only), or Apache Kafka (--kafka)."
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
        "--kafka",
        action="store_true",
        help="run Apache Kafka (KRaft, Java 17+, jars fetched with Maven once) instead of "
        "Tansu: PLAINTEXT + SASL_SSL/SCRAM listeners, ACLs for a worker and a ranker user",
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
    from emerg_stream.errors import ConfigError
    from emerg_stream.stream.apache_kafka import PRINCIPALS, ApacheKafka
    from emerg_stream.stream.broker import EmbeddedBroker

    log = structlog.get_logger("jobs.broker")
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    broker: EmbeddedBroker | ApacheKafka
    if args.kafka:
        if args.authentication:
            raise ConfigError("--authentication is Tansu's; Kafka always has a SASL_SSL listener")
        broker = ApacheKafka(port=args.port)
    else:
        broker = EmbeddedBroker(port=args.port, authentication=args.authentication)
    try:
        with broker:
            if args.topics:
                from emerg_stream.stream.topics import ensure_topics

                settings = load_settings(Settings)
                ensure_topics({"bootstrap.servers": broker.bootstrap}, args.topics, settings.topics)
            print(broker.bootstrap, flush=True)
            if isinstance(broker, ApacheKafka):
                print(f"sasl_ssl {broker.sasl_bootstrap}", flush=True)
                print(f"ca {broker.ca_path}", flush=True)
                for p in PRINCIPALS:
                    print(f"env.{p.name} {broker.env_file(p.name)}", flush=True)
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
