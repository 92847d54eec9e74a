"""Per-item losses: the reduction that makes one backward pass give every item its gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from emerg_stream.meta.rows import Rows
from emerg_stream.model.base import ItemModel, Phi


def per_item_mean_loss(model: ItemModel, rows: Rows, phi: Phi, n_items: int) -> Tensor:
    """Mean BCE over each item's own rows.

    Because items share no φ entries, the gradient of ``loss.sum()`` with respect to
    the stacked φ is, item by item, the gradient of that item's own mean loss.

    Args:
        model: The item model.
        rows: Rows whose ``item`` indexes into ``phi``.
        phi: Stacked item-specific parameters ``[I, ...]``.
        n_items: I.

    Returns:
        ``[I]`` mean loss per item (0 for an item without rows).
    """
    logits = model(rows.tokens, rows.weights, phi, rows.item)
    losses = F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none")
    sums = torch.zeros(n_items, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, rows.item, losses)
    counts = torch.bincount(rows.item, minlength=n_items).clamp_min(1).to(losses.dtype)
    return sums / counts
