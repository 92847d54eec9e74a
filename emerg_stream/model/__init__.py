"""nn.Modules only: EmerG and the DeepFM/MetaE baselines (imports torch, nothing else)."""

from emerg_stream.model.base import ItemModel, Phi, Prepared, gather_rows, item_noise
from emerg_stream.model.config import ModelConfig
from emerg_stream.model.deepfm import DeepFM
from emerg_stream.model.emerg import EmerG


def build_model(config: ModelConfig) -> ItemModel:
    """Instantiate the model a config describes."""
    if config.kind == "emerg":
        return EmerG(config)
    return DeepFM(config)


__all__ = [
    "DeepFM",
    "EmerG",
    "ItemModel",
    "ModelConfig",
    "Phi",
    "Prepared",
    "build_model",
    "gather_rows",
    "item_noise",
]
