"""Thin entry point of ``emerg-stream config``: ``python jobs/config.py ARGS``.

The job itself is :mod:`emerg_stream.jobs.config`.
"""

import sys

from emerg_stream import cli


def main() -> int:
    """Run ``emerg-stream config`` with this script's arguments."""
    return cli.main(["config", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
