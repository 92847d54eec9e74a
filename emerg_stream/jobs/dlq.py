"""``emerg-stream dlq replay``: re-inject dead letters into their source topics.

``emerg-stream dlq kinds`` prints docs/ERROR_KINDS.md: every ``error_kind`` and its meaning,
generated from :data:`emerg_stream.stream.dlq.KINDS` (a unit test keeps the file equal).

After the cause of a dead letter is fixed (the item was announced, the producer fixed,
the checkpoint's spec extended), each matching dead letter's raw value goes back, with
its key, to its source topic and partition; the worker processes it like any record
(an interaction already applied is counted ``duplicate`` by event id). The cluster and
topic names come from ``EMERG_KAFKA__*`` / ``EMERG_TOPICS__*``.
"""

from __future__ import annotations

import argparse

HELP = "Replay dead letters into their source topics (after the cause is fixed)."
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["replay", "kinds"],
        help="replay dead letters / print the error kinds' reference (docs/ERROR_KINDS.md)",
    )
    parser.add_argument(
        "--kind", action="append", default=None, help="only this error_kind (repeatable)"
    )
    parser.add_argument("--limit", type=int, default=None, help="replay at most N records")
    parser.add_argument("--bootstrap", default=None, help="bootstrap servers (overrides settings)")
    parser.add_argument("--timeout", type=float, default=60.0, help="read/flush deadline, s")


def run(args: argparse.Namespace) -> int:
    from emerg_stream.config import Settings, load_settings
    from emerg_stream.errors import ConfigError
    from emerg_stream.stream.dlq import ERROR_KINDS, kinds_markdown, replay_dead_letters

    if args.action == "kinds":
        print(kinds_markdown(), end="")
        return 0
    unknown = sorted(set(args.kind or []) - set(ERROR_KINDS))
    if unknown:
        raise ConfigError(f"unknown --kind {unknown}; one of {', '.join(ERROR_KINDS)}")
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be >= 0")
    overrides = {"kafka": {"bootstrap_servers": args.bootstrap}} if args.bootstrap else None
    settings = load_settings(Settings, overrides)
    report = replay_dead_letters(
        settings.kafka.as_librdkafka(),
        settings.topics.dead_letter,
        kinds=set(args.kind) if args.kind else None,
        limit=args.limit,
        timeout_s=args.timeout,
    )
    replayed = sum(report.replayed.values())
    where = ", ".join(f"{t}: {n}" for t, n in sorted(report.replayed.items())) or "-"
    print(
        f"read {report.read} dead letters, replayed {replayed} ({where}), skipped {report.skipped}"
    )
    return 0
