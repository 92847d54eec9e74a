"""Serialisation: the Avro codec of every topic (:mod:`.avro`, :mod:`.schemas`, :mod:`.records`).

No torch here (an import contract checked by ``tests/unit/test_imports.py``).
"""
