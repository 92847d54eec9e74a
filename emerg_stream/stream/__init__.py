"""The streaming side: consume loop, commit policy, dead letters, publisher, broker launcher.

No torch here (an import contract checked by ``tests/unit/test_imports.py``); the stream
calls a handler protocol that ``emerg_stream.serving`` implements. Submodules are imported
explicitly (``from emerg_stream.stream.broker import EmbeddedBroker``) so that importing
one does not pull in the others.
"""
