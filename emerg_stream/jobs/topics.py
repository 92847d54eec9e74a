"""``emerg-stream topics``: create the pipeline's topics, or check an existing layout.

``create`` is idempotent (existing topics are left alone) and ends with the
co-partitioning check the worker also runs at start. ``check`` only runs that check.
Names come from the settings (``EMERG_TOPICS__*``), the cluster from ``EMERG_KAFKA__*``.
"""

from __future__ import annotations

import argparse

HELP = "Create the pipeline's topics from infra/topics.yaml (idempotent), or check them."
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False

DEFAULT_SPEC = "infra/topics.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["create", "check"], help="create missing topics / check the layout"
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"topic spec file (default: {DEFAULT_SPEC} if present, else built-in defaults)",
    )
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="bootstrap servers (default: EMERG_KAFKA__BOOTSTRAP_SERVERS)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="admin request deadline, s")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import structlog
    from confluent_kafka.admin import AdminClient

    from emerg_stream.config import Settings, load_settings
    from emerg_stream.errors import ConfigError
    from emerg_stream.stream.topics import (
        check_copartitioned,
        ensure_topics,
        load_topic_specs,
        topic_partitions,
    )

    log = structlog.get_logger("jobs.topics")
    overrides = {"kafka": {"bootstrap_servers": args.bootstrap}} if args.bootstrap else None
    settings = load_settings(Settings, overrides)
    spec_path: Path | None
    if args.config is not None:
        spec_path = Path(args.config)
        if not spec_path.is_file():
            raise ConfigError(f"no topic spec file {spec_path}")
    else:
        spec_path = Path(DEFAULT_SPEC) if Path(DEFAULT_SPEC).is_file() else None
        if spec_path is None:
            log.info("topic_specs_builtin", reason=f"{DEFAULT_SPEC} not found")
    specs = load_topic_specs(spec_path, settings.topics)
    conf = settings.kafka.as_librdkafka()

    status: dict[str, str] = {}
    if args.action == "create":
        status = dict(ensure_topics(conf, specs, timeout_s=args.timeout))
    admin = AdminClient(dict(conf))
    counts = topic_partitions(admin, [s.name for s in specs], timeout_s=args.timeout)
    for s in specs:
        found = counts.get(s.name)
        state = status.get(s.name, "exists" if found is not None else "missing")
        print(f"{s.name:<32} {state:<8} partitions={found if found is not None else '-'}")
    n = check_copartitioned(
        admin, settings.topics.items, settings.topics.interactions, timeout_s=args.timeout
    )
    print(f"co-partitioned: {settings.topics.items} and {settings.topics.interactions} ({n})")
    return 0
