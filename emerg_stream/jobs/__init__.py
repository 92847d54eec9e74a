"""One module per ``emerg-stream`` sub-command (registered in :data:`emerg_stream.cli.COMMANDS`).

Each defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` and imports its
heavy dependencies inside ``run``; the repository's top-level ``jobs/`` folder holds a
thin script per job that runs it through :func:`emerg_stream.cli.main`.
"""
