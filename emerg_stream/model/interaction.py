"""Graph message passing (one layer per interaction order) and attention over orders."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class GraphInteraction(nn.Module):
    """Customised message passing over an item-specific feature graph.

    h_r^(0) = e_r;  h_r^(l) = h_r^(l-1) ⊙ act( Σ_s Â_l[r, s] · W_l h_s^(0) ).

    Neighbours send their *first-order* embeddings, so layer l outputs interactions of
    order l+1 (no residual connection).

    Args:
        dim: d.
        layers: L.
        activation: ``relu``, ``leaky_relu`` or ``identity`` (all positively homogeneous).
        activate_last: Apply it on layer L too (the authors' code leaves L linear).
    """

    def __init__(
        self, dim: int, layers: int, activation: str = "relu", activate_last: bool = True
    ) -> None:
        super().__init__()
        self.weights = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.activation = activation
        self.activate_last = activate_last

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
            if torch.compiler.is_compiling():  # a broadcast sum fuses; a tiny bmm does not
                msg = (graphs[:, layer].unsqueeze(-1) * w(e).unsqueeze(1)).sum(2)
            else:
                msg = graphs[:, layer] @ w(e)
            if layer < len(self.weights) - 1 or self.activate_last:
                if self.activation == "relu":
                    msg = torch.relu(msg)
                elif self.activation == "leaky_relu":
                    msg = F.leaky_relu(msg)
            h = h * msg
            outs.append(h)
        return torch.stack(outs, dim=1)


class OrderAttention(nn.Module):
    """Per-field multi-head self-attention over the orders [h^(0) .. h^(L)].

    For each field, with O = L+1 orders and head h (query/key/value maps Wq_h, Wk_h,
    Wv_h of size ``head_dim x D``, output map Wout_h its block of ``out``)::

        a[o, p, h] = softmax_p( (Wq_h x_o) · (Wk_h x_p) / sqrt(head_dim) )
        ĥ = mean_o out( concat_h Σ_p a[o, p, h] Wv_h x_p )

    The forward pass evaluates the same function in an order that is cheaper for these
    tiny per-field problems (O is 3 or 4): the score is the bilinear form
    x_oᵀ M_h x_p with M_h = Wq_hᵀ Wk_h / sqrt(head_dim), and because ``out`` is affine the
    mean over o moves inside it, ĥ = b + Σ_h N_h Σ_p ā[p, h] x_p with N_h = Wout_h Wv_h and
    ā = mean_o a. The parameters (``qkv``, ``out``) are the standard ones; only the
    evaluation order differs, so a checkpoint means the same thing either way.

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

    def folded_weights(self) -> tuple[Tensor, Tensor]:
        """(M, N): the per-head score and value-output maps, ``[H*D, D]`` and ``[D, H*D]``.

        M stacks M_h = Wq_hᵀ Wk_h / sqrt(head_dim) over heads (row h*D + c = M_h[c]);
        N concatenates N_h = Wout_h Wv_h over heads (columns h*D .. h*D + D - 1).
        """
        h, e = self.heads, self.head_dim
        d = self.qkv.in_features
        w = self.qkv.weight.view(3, h, e, d)
        m = torch.einsum("hec,hed->hcd", w[0], w[1]) / math.sqrt(e)
        n = torch.einsum("ohe,hed->ohd", self.out.weight.view(-1, h, e), w[2])
        return m.reshape(h * d, d), n.reshape(-1, h * d)

    def forward(self, h: Tensor) -> Tensor:
        """Combine orders.

        Args:
            h: ``[B, L+1, F, D]``.

        Returns:
            ``[B, F, D]``: ĥ_r, the mean over orders of the attended representations.
        """
        b, o, f, d = h.shape
        heads = self.heads
        m, n = self.folded_weights()
        x = h.transpose(1, 2).reshape(b * f, o, d)  # one small problem per (row, field)
        u = F.linear(x, m)  # [., p, (h, D)]: u[p, h] = M_h x_p
        # the same function either way; each form is the faster one where it runs
        mix = _mix_broadcast if torch.compiler.is_compiling() else _mix_bmm
        g = mix(x, u, heads)
        out: Tensor = F.linear(g.view(b, f, heads * d), n, self.out.bias)
        return out


def _mix_bmm(x: Tensor, u: Tensor, heads: int) -> Tensor:
    """g[h] = Σ_p ā[p, h] x_p with batched matmuls (the fastest form in eager mode).

    Args:
        x: ``[N, O, D]``, one row per (row, field) problem.
        u: ``[N, O, H*D]`` score projections.
        heads: H.

    Returns:
        ``[N, H, D]``.
    """
    nb, o, d = x.shape
    scores = torch.bmm(x, u.view(nb, o * heads, d).transpose(1, 2)).view(nb, o, o, heads)
    att = scores.softmax(dim=2).mean(dim=1)  # ā[p, h], scores indexed [., o, p, h]
    return torch.bmm(att.transpose(1, 2), x)


def _mix_broadcast(x: Tensor, u: Tensor, heads: int) -> Tensor:
    """The same as :func:`_mix_bmm` as broadcast products and sums.

    In eager mode this materialises ``[N, O, O, H, D]`` and is slower; under
    ``torch.compile`` the products and sums fuse with the softmax into a few loops
    over N, which is faster than the tiny batched matmuls (docs/BENCHMARKS.md).
    """
    nb, o, d = x.shape
    scores = (x.view(nb, o, 1, 1, d) * u.view(nb, 1, o, heads, d)).sum(-1)  # [., o, p, h]
    att = scores.softmax(dim=2).mean(dim=1)  # ā[p, h]
    return (att.unsqueeze(-1) * x.unsqueeze(2)).sum(1)


class JointAttention(nn.Module):
    """One multi-head self-attention over all (order, field) tokens (the authors' code).

    Token (o, r) has query and key from the whole order vector x_o = vec(h^(o)) ∈ R^{F·D}
    (q_{o,r,h} = (Wq x_o)_{r,h}, likewise k) and value Wv_h h_r^(o); every token attends
    to all O·F tokens, so a field's output mixes every field of every order (the new
    item's ID embedding reaches the user fields' outputs directly)::

        out_{o,r} = Wres concat_h Σ_{o',s} softmax(q_{o,r,h} · k_{o',s,h} / sqrt(a)) v_{o',s,h}
        ĥ_r = Σ_o relu(out_{o,r})

    Args:
        n_fields: F.
        dim: d.
        heads: H.
        head_dim: a, the size of each head.
    """

    def __init__(self, n_fields: int, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.q = nn.Linear(n_fields * dim, n_fields * heads * head_dim, bias=False)
        self.k = nn.Linear(n_fields * dim, n_fields * heads * head_dim, bias=False)
        self.v = nn.Linear(dim, heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        """Combine orders and fields.

        Args:
            h: ``[B, L+1, F, D]``.

        Returns:
            ``[B, F, D]``.
        """
        b, o, f, _ = h.shape
        heads, a = self.heads, self.head_dim
        x = h.reshape(b, o, -1)

        def tokens(t: Tensor) -> Tensor:  # [B, O, F, H*a] -> [B, H, O*F, a]
            return t.view(b, o * f, heads, a).transpose(1, 2)

        q = tokens(self.q(x))
        k = tokens(self.k(x))
        v = tokens(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a), dim=-1)
        mixed = (att @ v).transpose(1, 2).reshape(b, o, f, heads * a)
        out: Tensor = torch.relu(self.out(mixed)).sum(dim=1)
        return out


def fm_term(e: Tensor) -> Tensor:
    """Σ_{r<s} <e_r, e_s> of first-order embeddings ``[B, F, D]`` -> ``[B]``."""
    total = e.sum(dim=1)
    out: Tensor = 0.5 * (total.square().sum(-1) - e.square().sum((1, 2)))
    return out


class Predictor(nn.Module):
    """Contribution-weighted prediction.

    c = sigmoid(W_c · concat(ĥ_1..ĥ_F) + b_c) ∈ R^F;  logit = Σ_r c_r · wᵀ ĥ_r + b.

    Args:
        n_fields: F.
        dim: d.
        bias: Learn b_c and b; without them (the authors' predictor) both are fixed
            zeros (buffers, so the kernel reads the same argument list either way).
    """

    def __init__(self, n_fields: int, dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.contrib = nn.Linear(n_fields * dim, n_fields, bias=bias)
        self.w = nn.Linear(dim, 1, bias=False)
        self.b: Tensor
        if bias:
            self.b = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("b", torch.zeros(()))
            self.register_buffer("contrib_bias", torch.zeros(n_fields))

    @property
    def contrib_bias_or_zero(self) -> Tensor:
        """b_c, or the fixed zeros of a predictor without bias."""
        bias = self.contrib.bias
        return bias if bias is not None else self.contrib_bias

    def forward(self, h: Tensor) -> Tensor:
        """``[B, F, D] -> [B]`` logits (the sigmoid is left to the loss)."""
        c = torch.sigmoid(self.contrib(h.flatten(1)))
        out: Tensor = (c * self.w(h).squeeze(-1)).sum(dim=1) + self.b
        return out

    def contributions(self, h: Tensor) -> Tensor:
        """Each field's contribution factor c, ``[B, F]``."""
        return torch.sigmoid(self.contrib(h.flatten(1)))
