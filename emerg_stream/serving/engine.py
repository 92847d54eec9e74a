"""The batched tensor side of the worker: a micro-batch's φ on the device.

:class:`TorchBatchSession` implements :class:`emerg_stream.stream.handler.BatchSession`.
It stacks the φ of every item of the batch once (its method's entries, e.g. EmerG's
``adj [I, F, F]`` and ``id [I, D]``; :mod:`emerg_stream.serving.phi`),
encodes each item's row of item fields once (``[I, F, T]``), and then:

* ``score``: one forward pass over all rows of a round (EmerG's on the warm-up's CPU
  kernel where that runs, torch's otherwise); a row's item fields are copied
  from its item's encoded row (``tokens[:, :n_item] = item_tokens[slots, :n_item]``), so
  only the user fields are encoded per row;
* ``update``: one :func:`emerg_stream.meta.warmup.warm_up` call over all crossing items
  (each item's loss is the mean over its own rows), written back into the stacked φ;
* ``params``: the only device -> host copy, for the params that get published.

No loop over items runs on the device path; the Python loops here build the feature
dicts handed to the vectorised encoder.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from emerg_stream.features import FeatureSpec, encode_records
from emerg_stream.io.records import SupportRow
from emerg_stream.meta.rows import Rows, to_device
from emerg_stream.meta.warmup import Backend, WarmupConfig, resolve_backend, warm_up
from emerg_stream.methods import Method
from emerg_stream.model.base import ItemModel, Phi
from emerg_stream.model.emerg import EmerG
from emerg_stream.serving.phi import arrays_to_phi, phi_to_arrays
from emerg_stream.stream.handler import ItemFeatures, ParamsArrays

__all__ = ["FeatureColumns", "TorchBatchSession"]


class FeatureColumns:
    """Turns records' feature maps into the flat column dicts the encoder reads.

    Only columns of the right side *and* kind are taken (the worker dead-letters records
    whose maps contradict the spec before they get here); ids go last so a feature map
    cannot overwrite them. Items are encoded on their item fields only and remembered
    (the ``cache_items`` most recently used, keyed by id and checked against the
    features, so a re-announced item with other features is encoded again): an item
    comes back in batch after batch while its clicks arrive. Interactions are encoded
    on their user fields only (the item's are copied in by the session).

    Args:
        spec: The checkpoint's feature spec.
        cache_items: Encoded items remembered (about 0.5 KiB each at F = 9, T = 8).
    """

    def __init__(self, spec: FeatureSpec, cache_items: int = 4096) -> None:
        self.spec = spec
        self.item_id = spec.schema.item_id
        self.user_id = spec.schema.user_id
        self.n_item_fields = spec.n_item_fields
        self._kinds: dict[str, dict[str, str]] = {"item": {}, "user": {}}
        for f in spec.fields:
            if f.name not in (self.item_id, self.user_id):
                self._kinds[f.side][f.name] = f.kind
        self._fields = {
            side: frozenset(j for j, f in enumerate(spec.fields) if f.side == side)
            for side in ("item", "user")
        }
        self._cache_items = cache_items
        self._cache: OrderedDict[
            str, tuple[ItemFeatures, npt.NDArray[np.int64], npt.NDArray[np.float32]]
        ] = OrderedDict()

    def item_record(self, item: ItemFeatures) -> dict[str, Any]:
        """Flat record of an item's fields (user fields absent)."""
        kinds = self._kinds["item"]
        out: dict[str, Any] = {}
        for name, token in item.categorical.items():
            if kinds.get(name) == "categorical":
                out[name] = token
        for name, tokens in item.multi.items():
            if kinds.get(name) == "multi":
                out[name] = list(tokens)
        for name, number in item.numeric.items():
            if kinds.get(name) == "numeric":
                out[name] = number
        out[self.item_id] = item.item_id
        return out

    def user_record(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Flat record of an interaction's user fields (item fields absent)."""
        kinds = self._kinds["user"]
        out: dict[str, Any] = {}
        for kind in ("categorical", "multi", "numeric"):
            for name, value in row[kind].items():
                if kinds.get(name) == kind:
                    out[name] = value
        out[self.user_id] = row["user_id"]
        return out

    def encode_items(self, items: Sequence[ItemFeatures]) -> tuple[Tensor, Tensor]:
        """``tokens [I, F, T]`` long and ``weights [I, F, T]`` float32 (CPU) of items.

        Only the item fields are encoded; the user fields are padding.
        """
        f, t = self.spec.n_fields, self.spec.max_tokens
        tokens = np.zeros((len(items), f, t), dtype=np.int64)
        weights = np.zeros((len(items), f, t), dtype=np.float32)
        cache, misses = self._cache, []
        for i, item in enumerate(items):
            hit = cache.get(item.item_id)
            if hit is not None and hit[0] == item:
                cache.move_to_end(item.item_id)
                tokens[i], weights[i] = hit[1], hit[2]
            else:
                misses.append(i)
        if misses:
            enc = encode_records(
                self.spec, [self.item_record(items[i]) for i in misses], fields=self._fields["item"]
            )
            tokens[misses], weights[misses] = enc.tokens, enc.weights
            for k, i in enumerate(misses):
                cache[items[i].item_id] = (items[i], enc.tokens[k].copy(), enc.weights[k].copy())
                cache.move_to_end(items[i].item_id)
            while len(cache) > self._cache_items:
                cache.popitem(last=False)
        return torch.from_numpy(tokens), torch.from_numpy(weights)

    def encode_users(self, rows: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """``tokens [B, F, T]`` and ``weights [B, F, T]`` (CPU); item fields are padding."""
        enc = encode_records(
            self.spec, [self.user_record(r) for r in rows], fields=self._fields["user"]
        )
        return torch.from_numpy(enc.tokens), torch.from_numpy(enc.weights)


class TorchBatchSession:
    """φ of one micro-batch's items on a device (see the module docstring).

    Args:
        model: The item model (eval mode, on ``device``).
        method: Its registered method (which φ entries the session holds).
        columns: Record -> column mapping of the checkpoint's spec.
        items: ``[I]`` items of the batch.
        params: ``[I]`` their current φ (rows of ``trained`` items are ignored).
        trained: ``[I]`` items that use trained params (old items).
        warmup: The checkpoint's warm-up protocol.
        device: Where φ lives during the batch.
        backend: Where warm-up gradients come from (see ``warm_up``).
    """

    def __init__(
        self,
        model: ItemModel,
        method: Method,
        columns: FeatureColumns,
        items: Sequence[ItemFeatures],
        params: ParamsArrays,
        trained: npt.NDArray[np.bool_],
        warmup: WarmupConfig,
        device: torch.device,
        *,
        backend: Backend = "auto",
    ) -> None:
        n = len(items)
        if len(params) != n or trained.shape != (n,):
            raise ValueError(f"{n} items but {len(params)} params and {trained.shape} flags")
        self.model = model
        self.method = method
        self.columns = columns
        self.warmup = warmup
        self.device = device
        self.backend = backend
        # EmerG scores on the warm-up's kernel where it runs (the forward alone; equal to
        # the model's forward to float rounding, tests/unit/test_cpu_kernel.py)
        dtype = next(model.parameters()).dtype
        kernel = resolve_backend(model, backend, dtype, device)[1]
        # the shared parameters as the kernel reads them: fixed for the session
        self._kernel = (
            (kernel, kernel.weights(model))
            if kernel is not None and isinstance(model, EmerG)
            else None
        )
        tokens, weights = columns.encode_items(items)
        self._item_tokens = to_device(tokens, device)
        self._item_weights = to_device(weights, device)
        cfg = model.config
        self.phi: Phi = arrays_to_phi(method, params, cfg.n_fields, cfg.dim, device)
        old = np.flatnonzero(trained)
        if old.size:
            idx = to_device(torch.from_numpy(old), device)
            with torch.no_grad():
                tp = model.trained_params(self._item_tokens[idx], self._item_weights[idx])
            for k in self.phi:
                self.phi[k][idx] = tp[k].detach().to(self.phi[k].dtype)

    def _rows(self, slots: Tensor, rows: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        tokens, weights = self.columns.encode_users(rows)
        tokens, weights = to_device(tokens, self.device), to_device(weights, self.device)
        m = self.columns.n_item_fields
        tokens[:, :m] = self._item_tokens[slots, :m]
        weights[:, :m] = self._item_weights[slots, :m]
        return tokens, weights

    def score(
        self, slots: npt.NDArray[np.int64], rows: Sequence[SupportRow]
    ) -> npt.NDArray[np.float64]:
        """Click probabilities ``[B]``; see :class:`~emerg_stream.stream.handler.BatchSession`."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float64)
        idx = to_device(torch.from_numpy(np.asarray(slots, dtype=np.int64)), self.device)
        tokens, weights = self._rows(idx, rows)
        with torch.no_grad():
            if self._kernel is not None and isinstance(self.model, EmerG):
                kernel, kernel_weights = self._kernel
                logits = kernel.logits(
                    self.model,
                    self.model.graphs(self.phi["adj"]),
                    self.phi["id"],
                    idx,
                    kernel_weights,
                    tokens=tokens[:, 1:].contiguous(),
                    token_weights=weights[:, 1:].contiguous(),
                    table=self.model.embedding.table.weight,
                )
            else:
                logits = self.model(tokens, weights, self.phi, idx)
        out: npt.NDArray[np.float64] = torch.sigmoid(logits).double().cpu().numpy()
        return out

    def update(self, slots: npt.NDArray[np.int64], support: Sequence[Sequence[SupportRow]]) -> None:
        """One warm-up phase of ``slots`` on their support rows, in place."""
        if len(slots) == 0:
            return
        lens = np.fromiter((len(s) for s in support), dtype=np.int64, count=len(support))
        flat = [r for rows in support for r in rows]
        row_slots = torch.from_numpy(np.repeat(np.asarray(slots, dtype=np.int64), lens))
        tokens, weights = self._rows(to_device(row_slots, self.device), flat)
        labels = torch.tensor([float(r["label"]) for r in flat], dtype=torch.float32)
        item = torch.from_numpy(np.repeat(np.arange(len(slots), dtype=np.int64), lens))
        rows = Rows(tokens, weights, to_device(labels, self.device), to_device(item, self.device))
        idx = to_device(torch.from_numpy(np.asarray(slots, dtype=np.int64)), self.device)
        current = {k: v[idx] for k, v in self.phi.items()}
        new = warm_up(self.model, current, rows, self.warmup, backend=self.backend)
        for k in self.phi:
            self.phi[k][idx] = new[k].to(self.phi[k].dtype)

    def params(self, slots: npt.NDArray[np.int64]) -> ParamsArrays:
        """Current φ of ``slots`` on the host (float32)."""
        idx = to_device(torch.from_numpy(np.asarray(slots, dtype=np.int64)), self.device)
        return phi_to_arrays(self.method, {k: v[idx] for k, v in self.phi.items()})
