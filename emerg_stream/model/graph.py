"""Item-specific feature graphs: the hypernetwork generator and the refinement.

The generator turns an item's side-feature embeddings into a raw F x F matrix A_i
(the item-specific parameter that warm-up adapts). :func:`refine` derives the graphs
every message-passing layer reads, so only one matrix per item is ever stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def minmax_norm(m: Tensor, eps: float = 1e-12) -> Tensor:
    """Norm(M): min-max scale each matrix to [0, 1], then set its diagonal to 1.

    Args:
        m: ``[..., F, F]``.
        eps: Floor of the range (a constant matrix maps to 0).

    Returns:
        ``[..., F, F]`` with entries in [0, 1] and ones on the diagonal.
    """
    flat = m.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values.unsqueeze(-1)
    hi = flat.max(dim=-1, keepdim=True).values.unsqueeze(-1)
    scaled = (m - lo) / (hi - lo).clamp_min(eps)
    eye = torch.eye(m.shape[-1], dtype=torch.bool, device=m.device)
    return scaled.masked_fill(eye, 1.0)


def topk_sparsify(m: Tensor, k: int) -> Tensor:
    """TopK_k(M): keep the k largest entries of each matrix, zero the rest.

    Args:
        m: ``[..., F, F]``.
        k: Entries kept per matrix (ties broken by position).

    Returns:
        ``[..., F, F]``; gradients flow through the kept entries.
    """
    f2 = m.shape[-1] * m.shape[-2]
    if k >= f2:
        return m
    flat = m.flatten(-2)
    idx = flat.topk(k, dim=-1).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return (flat * keep).view_as(m)


def refine(
    raw: Tensor, layers: int, k: int, *, use_mask: bool = True, sparsify: bool = True
) -> Tensor:
    """Derive the per-layer graphs Â_1..Â_L from a raw generator output.

    Ã = TopK_k(Norm(A)); Â_1 = (Ã + Ãᵀ)/2; Â_l = Norm(Â_1^l) ⊙ 1[Â_{l-1} != 0] for l >= 2.

    Args:
        raw: ``[B, F, F]`` raw matrices A_i.
        layers: L.
        k: TopK's k.
        use_mask: Apply the lower-order mask (ablation switch).
        sparsify: Apply TopK (ablation switch).

    Returns:
        ``[B, L, F, F]``.
    """
    a = minmax_norm(raw)
    if sparsify:
        a = topk_sparsify(a, k)
    a1 = 0.5 * (a + a.transpose(-1, -2))
    out = [a1]
    power = a1
    for _ in range(1, layers):
        power = power @ a1
        power = 0.5 * (power + power.transpose(-1, -2))  # exact symmetry despite rounding
        nxt = minmax_norm(power)
        if use_mask:
            nxt = nxt * (out[-1] != 0).to(nxt.dtype)
        out.append(nxt)
    return torch.stack(out, dim=1)


class GraphGenerator(nn.Module):
    """Hypernetwork: F small MLPs, one per graph row, run as one batched computation.

    a_r = W2_r · relu(W1_r · z + b1_r) + b2_r, A = stack(a_1..a_F); with ``depth`` 2 a
    second hidden layer relu(Wm_r · h + bm_r) sits between (the authors' generator has
    two hidden layers of width F).

    Args:
        in_dim: Size of z (the concatenated item side-feature embeddings).
        n_fields: F.
        hidden: Hidden width of each row-MLP.
        depth: Hidden layers, 1 or 2.
    """

    def __init__(self, in_dim: int, n_fields: int, hidden: int, depth: int = 1) -> None:
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"the hypernetwork has 1 or 2 hidden layers, not {depth}")
        self.w1 = nn.Parameter(torch.empty(n_fields, in_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_fields, hidden))
        self.wm = nn.Parameter(torch.empty(n_fields, hidden, hidden)) if depth == 2 else None
        self.bm = nn.Parameter(torch.zeros(n_fields, hidden)) if depth == 2 else None
        self.w2 = nn.Parameter(torch.empty(n_fields, hidden, n_fields))
        self.b2 = nn.Parameter(torch.zeros(n_fields, n_fields))
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(in_dim))
        if self.wm is not None:
            nn.init.normal_(self.wm, std=1.0 / math.sqrt(hidden))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(hidden))

    def forward(self, z: Tensor) -> Tensor:
        """Generate raw graphs.

        Args:
            z: ``[B, in_dim]``.

        Returns:
            ``[B, F, F]``, row r produced by MLP_r.
        """
        h = torch.relu(torch.einsum("bi,rih->brh", z, self.w1) + self.b1)
        if self.wm is not None and self.bm is not None:
            h = torch.relu(torch.einsum("brh,rhk->brk", h, self.wm) + self.bm)
        return torch.einsum("brh,rhf->brf", h, self.w2) + self.b2
