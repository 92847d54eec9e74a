"""Thin entry point of ``emerg-stream data``: ``python jobs/data.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.data`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream data`` with this script's arguments."""
    return cli.main(["data", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
