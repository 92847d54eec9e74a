"""nn.Modules only: EmerG and the DeepFM/MetaE baselines (imports torch, nothing else)."""

from emerg_stream.model.base import ItemModel, Phi, Prepared, gather_rows, item_noise
from emerg_stream.model.config import ModelConfig
from emerg_stream.model.deepfm import DeepFM, MetaE
from emerg_stream.model.emerg import EmerG


def build_model(config: ModelConfig) -> ItemModel:
    """Instantiate the model a config describes: its method's class in the registry.

    Raises:
        ModelError: ``config.kind`` is not a registered method.
    """
    from emerg_stream.methods import get_method

    return get_method(config.kind).model_class()(config)


__all__ = [
    "DeepFM",
    "EmerG",
    "ItemModel",
    "MetaE",
    "ModelConfig",
    "Phi",
    "Prepared",
    "build_model",
    "gather_rows",
    "item_noise",
]
