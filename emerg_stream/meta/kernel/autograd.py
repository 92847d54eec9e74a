"""The kernel's passes as autograd nodes: the rows' loss and the support gradient.

:func:`row_loss` is a differentiable loss whose backward is the kernel's full gradient;
:func:`support_grad` is ∂loss/∂φ whose backward is the kernel's exact Hessian-vector
product, so meta-training's second-order term runs through the kernel too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from emerg_stream.meta.kernel.library import EmerGKernel, KernelRows
    from emerg_stream.model.emerg import EmerG

__all__ = ["row_loss", "support_grad"]


class _KernelFunction(torch.autograd.Function):
    """A kernel pass as an autograd node.

    Inputs: (kernel, model, rows, graphs, id, table, *weights), the differentiable ones
    from ``graphs`` on; :meth:`run` passes the model's embedding table.
    """

    @classmethod
    def run(
        cls,
        kernel: EmerGKernel,
        model: EmerG,
        rows: KernelRows,
        graphs: Tensor,
        id_emb: Tensor,
        weights: list[Tensor],
    ) -> Any:
        table = model.embedding.table.weight
        return cls.apply(  # type: ignore[no-untyped-call]
            kernel, model, rows, graphs, id_emb, table, *weights
        )


class _RowLoss(_KernelFunction):
    """The rows' loss, whose backward is the kernel's full gradient (computed with it)."""

    @staticmethod
    def forward(
        ctx: Any,
        kernel: EmerGKernel,
        model: EmerG,
        rows: KernelRows,
        graphs: Tensor,
        id_emb: Tensor,
        table: Tensor,
        *weights: Tensor,
    ) -> Tensor:
        loss, grads = kernel.full_grad(
            model, graphs, id_emb, rows, table, kernel.weights_of(list(weights))
        )
        ctx.grads = grads
        ctx.dtypes = [t.dtype for t in (graphs, id_emb, table, *weights)]
        return graphs.new_tensor(loss)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out = [(g * grad).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes, strict=True)]
        return (None, None, None, *out)


class _SupportGrad(_KernelFunction):
    """∂loss/∂(graphs, id) of the rows; its backward is the kernel's Hessian-vector product."""

    @staticmethod
    def forward(
        ctx: Any,
        kernel: EmerGKernel,
        model: EmerG,
        rows: KernelRows,
        graphs: Tensor,
        id_emb: Tensor,
        table: Tensor,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        kw = kernel.weights_of(list(weights))
        _, d_graphs, d_id = kernel.phi_grad(model, graphs, id_emb, rows, kw, table=table)
        ctx.kernel, ctx.model, ctx.rows, ctx.kw = kernel, model, rows, kw
        ctx.dtypes = [t.dtype for t in (graphs, id_emb, table, *weights)]
        ctx.save_for_backward(graphs, id_emb, table)
        return d_graphs.to(graphs.dtype), d_id.to(id_emb.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v_graphs: Tensor, v_id: Tensor) -> tuple[Tensor | None, ...]:
        graphs, id_emb, table = ctx.saved_tensors
        grads = ctx.kernel.hvp(ctx.model, graphs, id_emb, ctx.rows, table, ctx.kw, (v_graphs, v_id))
        out = [g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)]
        return (None, None, None, *out)


def row_loss(
    kernel: EmerGKernel,
    model: EmerG,
    rows: KernelRows,
    graphs: Tensor,
    id_emb: Tensor,
    weights: list[Tensor],
) -> Tensor:
    """Σ_rows inv_count · BCE as a differentiable 0-d tensor (first order only).

    Its gradient reaches ``graphs``, ``id_emb``, the embedding table (through the rows'
    tokens, which ``rows`` must carry) and every tensor of ``weights``
    (:func:`weight_tensors`), computed by the kernel in the forward call.
    """
    out: Tensor = _RowLoss.run(kernel, model, rows, graphs, id_emb, weights)
    return out


def support_grad(
    kernel: EmerGKernel,
    model: EmerG,
    rows: KernelRows,
    graphs: Tensor,
    id_emb: Tensor,
    weights: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """(∂loss/∂graphs, ∂loss/∂id_emb), differentiable once more (the exact second order).

    The backward of the returned gradients (the double backward of the loss) is the
    kernel's Hessian-vector product: its gradient reaches every input, the embedding
    table included, as autograd's ``create_graph=True`` would give.
    """
    d_graphs, d_id = _SupportGrad.run(kernel, model, rows, graphs, id_emb, weights)
    return d_graphs, d_id
