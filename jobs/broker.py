"""Thin entry point of ``emerg-stream broker``: ``python jobs/broker.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.broker`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream broker`` with this script's arguments."""
    return cli.main(["broker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
