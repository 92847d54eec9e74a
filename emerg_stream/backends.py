"""Where warm-up gradients come from: the backend names, without importing torch.

The CLI offers them as ``--warmup-backend`` choices and the worker's settings accept them
(``EMERG_WARMUP_BACKEND``); :mod:`emerg_stream.meta.warmup` says what each one does.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["WARMUP_BACKENDS", "WarmupBackend"]

#: ``auto``, ``autograd``, ``compile``, ``kernel``, ``kernel-bf16`` (meta.warmup.Backend).
WarmupBackend = Literal["auto", "autograd", "compile", "kernel", "kernel-bf16"]
WARMUP_BACKENDS: tuple[str, ...] = get_args(WarmupBackend)
