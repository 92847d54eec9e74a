"""Graph message passing (one layer per interaction order) and attention over orders."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GraphInteraction(nn.Module):
    """Customised message passing over an item-specific feature graph.

    h_r^(0) = e_r;  h_r^(l) = h_r^(l-1) ⊙ act( Σ_s Â_l[r, s] · W_l h_s^(0) ).

    Neighbours send their *first-order* embeddings, so layer l outputs interactions of
    order l+1 (no residual connection).

    Args:
        dim: d.
        layers: L.
        activation: ``relu`` or ``identity`` (both positively homogeneous).
    """

    def __init__(self, dim: int, layers: int, activation: str = "relu") -> None:
        super().__init__()
        self.weights = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.activation = activation

    def forward(self, e: Tensor, graphs: Tensor) -> Tensor:
        """Run L layers.

        Args:
            e: ``[B, F, D]`` field embeddings h^(0).
            graphs: ``[B, L, F, F]`` refined graphs Â_1..Â_L.

        Returns:
            ``[B, L+1, F, D]``: h^(0)..h^(L).
        """
        outs = [e]
        h = e
        for layer, w in enumerate(self.weights):
            msg = graphs[:, layer] @ w(e)
            if self.activation == "relu":
                msg = torch.relu(msg)
            h = h * msg
            outs.append(h)
        return torch.stack(outs, dim=1)


class OrderAttention(nn.Module):
    """Per-field multi-head self-attention over the orders [h^(0) .. h^(L)].

    Args:
        dim: d.
        heads: H.
        head_dim: Size of each head (H * head_dim need not equal d).
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        """Combine orders.

        Args:
            h: ``[B, L+1, F, D]``.

        Returns:
            ``[B, F, D]``: ĥ_r, the mean over orders of the attended representations.
        """
        b, o, f, _ = h.shape
        x = h.transpose(1, 2)  # [B, F, O, D]
        q, k, v = self.qkv(x).view(b, f, o, 3, self.heads, self.head_dim).unbind(dim=3)
        scores = torch.einsum("bfohe,bfphe->bfhop", q, k) / math.sqrt(self.head_dim)
        att = scores.softmax(dim=-1)
        mixed = torch.einsum("bfhop,bfphe->bfohe", att, v).reshape(b, f, o, -1)
        out: Tensor = self.out(mixed).mean(dim=2)
        return out


class Predictor(nn.Module):
    """Contribution-weighted prediction.

    c = sigmoid(W_c · concat(ĥ_1..ĥ_F)) ∈ R^F;  logit = Σ_r c_r · wᵀ ĥ_r + b.

    Args:
        n_fields: F.
        dim: d.
    """

    def __init__(self, n_fields: int, dim: int) -> None:
        super().__init__()
        self.contrib = nn.Linear(n_fields * dim, n_fields)
        self.w = nn.Linear(dim, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor) -> Tensor:
        """``[B, F, D] -> [B]`` logits (the sigmoid is left to the loss)."""
        c = torch.sigmoid(self.contrib(h.flatten(1)))
        out: Tensor = (c * self.w(h).squeeze(-1)).sum(dim=1) + self.b
        return out

    def contributions(self, h: Tensor) -> Tensor:
        """Each field's contribution factor c, ``[B, F]``."""
        return torch.sigmoid(self.contrib(h.flatten(1)))
