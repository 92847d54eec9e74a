"""Thin entry point of ``emerg-stream replay``: ``python jobs/replay.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.replay`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream replay`` with this script's arguments."""
    return cli.main(["replay", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
