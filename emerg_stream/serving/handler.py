"""The worker's model handler: a checkpoint behind the stream's handler protocol.

:class:`TorchWarmupHandler` implements :class:`emerg_stream.stream.handler.WarmupHandler`
with the exact offline functions, so the stream publishes the offline protocol's φ:

* cold start = :func:`emerg_stream.meta.evaluate.cold_start` with the checkpoint's noise
  salt (:attr:`CheckpointMeta.noise_salt`): φ⁰ depends only on the item id and its side
  features;
* an update = one :func:`emerg_stream.meta.warmup.warm_up` phase with the checkpoint's
  warm-up protocol (:attr:`CheckpointMeta.warmup`), on the item's K rows since the last
  threshold;
* old items (:attr:`CheckpointMeta.old_item_ids`) use ``model.trained_params``.

Any registered method runs here: its φ entries travel in the stream's slots as
:mod:`emerg_stream.serving.phi` maps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from emerg_stream.devices import resolve_device
from emerg_stream.errors import ModelError
from emerg_stream.meta.checkpoint import Checkpoint, load_checkpoint
from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.kernel import KernelUnavailableError
from emerg_stream.meta.rows import ItemSet, Rows
from emerg_stream.meta.warmup import Backend, WarmupConfig, resolve_backend, warm_up
from emerg_stream.methods import PhiLayout
from emerg_stream.model.base import Phi
from emerg_stream.serving.engine import FeatureColumns, TorchBatchSession
from emerg_stream.serving.phi import phi_to_arrays
from emerg_stream.stream.handler import FieldInfo, ItemFeatures, ParamsArrays

__all__ = ["TorchWarmupHandler"]


class TorchWarmupHandler:
    """A loaded checkpoint serving the worker (see the module docstring).

    Args:
        checkpoint: The loaded checkpoint (its model is moved to ``device``).
        device: Where φ and the model live.
        warmup_backend: Where warm-up gradients come from (see
            :data:`~emerg_stream.meta.warmup.Backend`; the same φ within float rounding).
            Whatever it needs built (the CPU kernel: seconds, once per machine; a
            ``torch.compile`` step: tens of seconds per process) is built here, before
            the worker joins its group, not in its first batch.

    Raises:
        ModelError: The warm-up backend asked for cannot serve this model.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        warmup_backend: Backend = "auto",
    ) -> None:
        meta = checkpoint.meta
        self.method = checkpoint.method
        self._salt = meta.noise_salt
        self._k = meta.k
        self._warmup = meta.warmup
        self._old = frozenset(meta.old_item_ids)
        self.spec = meta.spec
        self.device = device
        self.model = checkpoint.model.to(device).eval()
        self._version = checkpoint.model_version
        self._layout = self.method.layout(self.model.config.n_fields, self.model.config.dim)
        self.columns = FeatureColumns(self.spec)
        self.warmup_backend = warmup_backend
        self._prepare_warmup()
        self._fields = tuple(
            FieldInfo(f.name, f.side, f.kind)
            for f in self.spec.fields
            if f.name not in (self.spec.schema.item_id, self.spec.schema.user_id)
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", *, warmup_backend: Backend = "auto"
    ) -> TorchWarmupHandler:
        """Load and verify a checkpoint directory (see :func:`load_checkpoint`)."""
        dev = resolve_device(device)
        return cls(load_checkpoint(path, device=dev), dev, warmup_backend=warmup_backend)

    def _prepare_warmup(self) -> None:
        """Build the warm-up backend now and say which one runs.

        The kernel builds (or loads from its cache) for the model's shape. A
        ``torch.compile`` step compiles on stand-in phases of 3 items and of 1 item:
        shapes are dynamic, but torch specialises a size of 1, and without the second
        stand-in the first one-item phase of the stream would recompile mid-batch.

        Raises:
            ModelError: ``kernel`` or ``kernel-bf16`` was asked for and cannot serve
                this model or machine.
        """
        import time

        import structlog

        t0 = time.perf_counter()
        dtype = next(self.model.parameters()).dtype
        try:
            kind, _ = resolve_backend(self.model, self.warmup_backend, dtype, self.device)
        except KernelUnavailableError as exc:
            raise ModelError(
                f"warm-up backend {self.warmup_backend!r} is unavailable: {exc}"
            ) from exc
        if kind == "compile":
            f, d, t = self.n_fields, self.dim, self.spec.max_tokens
            for item in ([0, 0, 1, 1, 1, 2, 2], [0, 0]):
                index = torch.tensor(item, device=self.device)
                n_items, n_rows = int(index.max()) + 1, len(item)
                phi: Phi = {
                    e.name: torch.zeros(n_items, *e.shape(f, d), device=self.device)
                    for e in self.method.phi
                }
                rows = Rows(
                    torch.zeros(n_rows, f, t, dtype=torch.long, device=self.device),
                    torch.zeros(n_rows, f, t, device=self.device),
                    torch.zeros(n_rows, device=self.device),
                    index,
                )
                warm_up(self.model, phi, rows, self._warmup, backend="compile")
        structlog.get_logger(__name__).info(
            "warmup_backend",
            asked=self.warmup_backend,
            runs=kind,
            seconds=round(time.perf_counter() - t0, 1),
        )

    @property
    def model_version(self) -> str:
        """The checkpoint's content hash."""
        return self._version

    @property
    def n_fields(self) -> int:
        """F."""
        return self.model.config.n_fields

    @property
    def dim(self) -> int:
        """D."""
        return self.model.config.dim

    @property
    def layout(self) -> PhiLayout:
        """The checkpoint's φ in the stream (method, slot sizes)."""
        return self._layout

    @property
    def k(self) -> int:
        """Rows per warm-up phase."""
        return self._k

    @property
    def old_item_ids(self) -> frozenset[str]:
        """Items of the training set."""
        return self._old

    @property
    def fields(self) -> Sequence[FieldInfo]:
        """Feature columns (ids excluded)."""
        return self._fields

    @property
    def warmup(self) -> WarmupConfig:
        """The warm-up protocol of every update."""
        return self._warmup

    def cold_start(self, items: Sequence[ItemFeatures]) -> ParamsArrays:
        """φ⁰ of ``items`` in one batched hypernetwork call."""
        if not items:
            return ParamsArrays.zeros(0, self.layout)
        tokens, weights = self.columns.encode_items(items)
        item_set = ItemSet([i.item_id for i in items], tokens, weights)
        phi = cold_start(self.model, item_set, salt=self._salt, device=self.device)
        return phi_to_arrays(self.method, phi)

    def open_batch(
        self,
        items: Sequence[ItemFeatures],
        params: ParamsArrays,
        trained: npt.NDArray[np.bool_],
    ) -> TorchBatchSession:
        """A session holding the batch's φ on the device."""
        return TorchBatchSession(
            self.model,
            self.method,
            self.columns,
            items,
            params,
            trained,
            self._warmup,
            self.device,
            backend=self.warmup_backend,
        )
