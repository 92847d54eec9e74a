"""Thin entry point of ``emerg-stream topics``: ``python jobs/topics.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.topics`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream topics`` with this script's arguments."""
    return cli.main(["topics", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
