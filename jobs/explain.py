"""Thin entry point of ``emerg-stream explain``: ``python jobs/explain.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.explain`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream explain`` with this script's arguments."""
    return cli.main(["explain", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
