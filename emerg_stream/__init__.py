"""emerg-stream: streaming warm-up of cold-start CTR prediction with EmerG."""

__version__ = "0.1.0"
