"""``emerg-stream config``: the configuration reference, and the settings in effect.

``doc`` prints ``docs/CONFIGURATION.md`` (generated from the settings classes);
``doc --check FILE`` exits 1 when FILE is out of date. ``show`` validates the
environment like a job does at start and prints every variable's value in effect,
secrets as ``***``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "print the configuration reference (EMERG_* variables) or the settings in effect"
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["doc", "show"], help="reference / values in effect")
    parser.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="FILE",
        help="doc: exit 1 if FILE differs from the generated reference",
    )
    parser.add_argument(
        "--worker", action="store_true", help="show: the worker's settings (default: shared)"
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from emerg_stream.config import Settings, WorkerSettings, load_settings
    from emerg_stream.config_doc import effective_values, render_markdown

    if args.action == "doc":
        text = render_markdown()
        if args.check is None:
            sys.stdout.write(text)
            return 0
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else ""
        if current != text:
            print(
                f"{args.check} is out of date: run "
                f"`emerg-stream config doc > {args.check}` and commit it",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check} is up to date")
        return 0
    settings = load_settings(WorkerSettings if args.worker else Settings)
    rows = effective_values(settings)
    width = max(len(name) for name, _, _ in rows)
    for name, value, from_env in rows:
        print(f"{name:<{width}}  {value}{'' if from_env else '   (default)'}")
    return 0
