"""Thin entry point of ``emerg-stream status``: ``python jobs/status.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.status`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream status`` with this script's arguments."""
    return cli.main(["status", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
