"""The ``emerg-stream`` command: one sub-command per job in :mod:`emerg_stream.jobs`.

:data:`COMMANDS` is the one registry of sub-commands: name -> module inside this package
(nothing is imported from outside it; the top-level ``jobs/`` folder of the repository
holds one thin script per job that calls :func:`main` with the job's name). Each job
module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and imports its heavy dependencies inside ``run`` so that
``emerg-stream --help`` stays fast. Before a job runs,
:func:`emerg_stream.threads.configure_threads` decides and applies its compute threads
(every job: no library starts more threads than the process may use); a job that never
loads torch says so with ``USES_TORCH = False``, which spares it torch's import.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import structlog

from emerg_stream.errors import EmergError

#: sub-command -> module of :mod:`emerg_stream.jobs`. Order is the order of ``--help``.
COMMANDS: dict[str, str] = {
    "reproduce": "emerg_stream.jobs.reproduce",
    "train": "emerg_stream.jobs.train",
    "evaluate": "emerg_stream.jobs.evaluate",
    "explain": "emerg_stream.jobs.explain",
    "split": "emerg_stream.jobs.split",
    "broker": "emerg_stream.jobs.broker",
    "topics": "emerg_stream.jobs.topics",
    "replay": "emerg_stream.jobs.replay",
    "worker": "emerg_stream.jobs.worker",
    "ranker": "emerg_stream.jobs.ranker",
    "evaluate-stream": "emerg_stream.jobs.evaluate_stream",
    "demo": "emerg_stream.jobs.demo",
    "data": "emerg_stream.jobs.data",
    "config": "emerg_stream.jobs.config",
    "report": "emerg_stream.jobs.report",
    "dlq": "emerg_stream.jobs.dlq",
    "status": "emerg_stream.jobs.status",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="emerg-stream",
        description="EmerG cold-start CTR warm-up: offline reproduction and streaming jobs.",
    )
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _uses_torch=getattr(module, "USES_TORCH", True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    from emerg_stream.logging import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(json=True if args.log_json else None, level=args.log_level)
    try:
        from emerg_stream.threads import configure_threads

        configure_threads(load_torch=args._uses_torch)
        code: int = args._run(args)
    except EmergError as exc:
        structlog.get_logger("emerg_stream.cli").error("command_failed", error=str(exc))
        print(f"emerg-stream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
