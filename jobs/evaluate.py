"""Thin entry point of ``emerg-stream evaluate``: ``python jobs/evaluate.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.evaluate`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream evaluate`` with this script's arguments."""
    return cli.main(["evaluate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
