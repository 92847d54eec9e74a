"""Thin entry point of ``emerg-stream ranker``: ``python jobs/ranker.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.ranker`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream ranker`` with this script's arguments."""
    return cli.main(["ranker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
