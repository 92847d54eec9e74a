"""Shared building blocks: the field embedding and a small MLP."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class FeatureEmbedding(nn.Module):
    """All fields' embeddings from one shared table.

    Each field j owns rows [offset_j, offset_j + size_j) of the table (row 0 = padding).
    A row's field embedding is the weighted sum of its tokens' vectors: weight 1 for a
    categorical value, 1/m for each of a multi-valued field's m tokens (the mean), and the
    normalised value x for a numeric field's single vector (x * v_j).

    Args:
        vocab_size: Rows of the table.
        dim: d.
        init_std: Std of the initial vectors.
    """

    def __init__(self, vocab_size: int, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=init_std)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """Embed.

        Args:
            tokens: ``[B, F, T]`` global token indices.
            weights: ``[B, F, T]`` token weights (0 for padding).

        Returns:
            ``[B, F, D]``.
        """
        # one fused gather + weighted sum per (row, field) bag of T tokens: the same sum
        # as (table[tokens] * weights).sum(2) without the [B, F, T, D] intermediate
        # (3.5-4x faster on CPU; padding tokens, index 0, are skipped)
        b, f, t = tokens.shape
        out = F.embedding_bag(
            tokens.reshape(b * f, t),
            self.table.weight,
            per_sample_weights=weights.reshape(b * f, t).to(self.table.weight.dtype),
            mode="sum",
            padding_idx=self.table.padding_idx,
        )
        return out.view(b, f, -1)


class MLP(nn.Module):
    """Linear-ReLU stack.

    Args:
        in_dim: Input width.
        hidden: Hidden widths.
        out_dim: Output width (no activation on the output).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        mods: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(dims[-1], out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_dim] -> [B, out_dim]``."""
        out: Tensor = self.net(x)
        return out
