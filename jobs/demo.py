"""Thin entry point of ``emerg-stream demo``: ``python jobs/demo.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.demo`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream demo`` with this script's arguments."""
    return cli.main(["demo", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
