"""Glue between the stream and the model: the worker's handler and the rankers' client.

Submodules are imported explicitly (``from emerg_stream.serving.ranker import
RankerClient``); importing this package imports neither torch nor Kafka.
"""
