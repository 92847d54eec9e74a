"""The one device resolver of every job, library call and benchmark.

torch is imported inside :func:`resolve_device` only, so the CLI can offer
:data:`DEVICES` as ``--device`` choices without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emerg_stream.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICES", "resolve_device"]

#: What ``--device`` accepts.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as named.

    Raises:
        ConfigError: ``cuda`` asked for without a CUDA device, or another name.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())
    if name != "cpu" and not cuda:
        raise ConfigError(f"unknown device {name!r}; use {', '.join(DEVICES)} (or cuda:N)")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA device is available")
    return torch.device(name)
