"""FeatureSpec (fields, vocabularies, one shared index space) and the tensor encoder.

Importing this package does not import torch; only :func:`to_torch` does.
"""

from emerg_stream.features.encode import (
    Encoded,
    EncodedTensors,
    encode,
    encode_records,
    item_side_index,
    to_torch,
)
from emerg_stream.features.spec import OOV, FeatureSpec, FieldInfo

__all__ = [
    "OOV",
    "Encoded",
    "EncodedTensors",
    "FeatureSpec",
    "FieldInfo",
    "encode",
    "encode_records",
    "item_side_index",
    "to_torch",
]
