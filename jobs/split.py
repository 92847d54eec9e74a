"""Thin entry point of ``emerg-stream split``: ``python jobs/split.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.split`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream split`` with this script's arguments."""
    return cli.main(["split", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
