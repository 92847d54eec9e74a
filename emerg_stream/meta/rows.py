"""Rows grouped by item, as torch tensors: the common input of every trainer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from emerg_stream.features import Encoded


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without a host sync on the way to a GPU.

    A host tensor bound for a GPU is copied to pinned memory and from there
    asynchronously: torch orders the copy before the kernels of the same stream that read
    it and keeps the pinned block until the copy is done (and reuses it afterwards).
    """
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Rows:
    """Labelled rows, each pointing at an item of an :class:`ItemSet`.

    Args:
        tokens: ``[N, F, T]`` long.
        weights: ``[N, F, T]`` float.
        labels: ``[N]`` float 0/1.
        item: ``[N]`` long, index into the item set.
    """

    tokens: Tensor
    weights: Tensor
    labels: Tensor
    item: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, idx: Tensor) -> Rows:
        """Rows at ``idx`` (same item indexing)."""
        return Rows(self.tokens[idx], self.weights[idx], self.labels[idx], self.item[idx])

    def to(self, device: torch.device | str) -> Rows:
        """Copy to a device (pinned and asynchronous from the host to a GPU)."""
        dev = torch.device(device)
        return Rows(
            *(to_device(t, dev) for t in (self.tokens, self.weights, self.labels, self.item))
        )


@dataclass
class ItemSet:
    """Items with one representative encoded row each (item fields are what matter).

    Args:
        ids: ``[I]`` item ids.
        tokens: ``[I, F, T]``.
        weights: ``[I, F, T]``.
    """

    ids: list[str]
    tokens: Tensor
    weights: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> ItemSet:
        """Copy to a device (pinned and asynchronous from the host to a GPU)."""
        dev = torch.device(device)
        return ItemSet(self.ids, to_device(self.tokens, dev), to_device(self.weights, dev))


def item_set_from(encoded: Encoded) -> tuple[ItemSet, np.ndarray]:
    """Items of an encoded table in order of first appearance, and each row's item index."""
    ids, first, inverse = np.unique(encoded.item_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    items = ItemSet(
        ids=[str(i) for i in ids[order]],
        tokens=torch.from_numpy(np.ascontiguousarray(encoded.tokens[first[order]])),
        weights=torch.from_numpy(np.ascontiguousarray(encoded.weights[first[order]])),
    )
    return items, rank[inverse.reshape(-1)]


def rows_for(encoded: Encoded, items: ItemSet) -> Rows:
    """Rows of an encoded table indexed into ``items``; unknown items raise ``KeyError``."""
    pos = {item_id: i for i, item_id in enumerate(items.ids)}
    idx = np.fromiter((pos[str(i)] for i in encoded.item_ids), dtype=np.int64)
    return Rows(
        tokens=torch.from_numpy(np.ascontiguousarray(encoded.tokens)),
        weights=torch.from_numpy(np.ascontiguousarray(encoded.weights)),
        labels=torch.from_numpy(np.asarray(encoded.labels, dtype=np.float32)),
        item=torch.from_numpy(idx),
    )
