"""Per-item losses: the reduction that makes one backward pass give every item its gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from emerg_stream.meta.rows import Rows
from emerg_stream.model.base import ItemModel, Phi, Prepared


def rows_per_item(item: Tensor, n_items: int, dtype: torch.dtype) -> Tensor:
    """``[I]`` how many rows each item has, at least 1: the denominator of its mean loss.

    Counted with ``index_add`` rather than ``bincount``: the same integers, and a shape
    that ``torch.compile`` can trace without a graph break (bincount's depends on the
    data).
    """
    ones = torch.ones(item.shape[0], dtype=dtype, device=item.device)
    return (
        torch.zeros(n_items, dtype=dtype, device=item.device).index_add(0, item, ones).clamp_min(1)
    )


def row_weights(item: Tensor, n_items: int, dtype: torch.dtype) -> Tensor:
    """``[B]`` each row's weight in its item's mean loss: one over the item's rows.

    Σ_rows row_weights · loss is ``per_item_mean_loss(...).sum()``; the CPU kernel takes
    its loss in that form.
    """
    return (1.0 / rows_per_item(item, n_items, dtype))[item]


def per_item_mean_loss(
    model: ItemModel, rows: Rows, phi: Phi, n_items: int, prepared: Prepared | None = None
) -> Tensor:
    """Mean BCE over each item's own rows.

    Because items share no φ entries, the gradient of ``loss.sum()`` with respect to
    the stacked φ is, item by item, the gradient of that item's own mean loss.

    Args:
        model: The item model.
        rows: Rows whose ``item`` indexes into ``phi``.
        phi: Stacked item-specific parameters ``[I, ...]``.
        n_items: I.
        prepared: ``model.prepare(rows.tokens, rows.weights)`` when the caller evaluates
            the same rows repeatedly (warm-up steps); the result is the same.

    Returns:
        ``[I]`` mean loss per item (0 for an item without rows).
    """
    if prepared is None:
        logits = model(rows.tokens, rows.weights, phi, rows.item)
    else:
        logits = model.forward_prepared(prepared, phi, rows.item)
    losses = F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none")
    sums = torch.zeros(n_items, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, rows.item, losses)
    return sums / rows_per_item(rows.item, n_items, losses.dtype)
