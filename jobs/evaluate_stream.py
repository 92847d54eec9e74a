"""Thin entry point of ``emerg-stream evaluate-stream``: ``python jobs/evaluate_stream.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.evaluate_stream`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream evaluate-stream`` with this script's arguments."""
    return cli.main(["evaluate-stream", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
