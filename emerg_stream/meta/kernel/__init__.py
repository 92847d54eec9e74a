"""EmerG's per-row loss and its derivatives as a compiled CPU kernel (``emerg_grad.cpp``).

A warm-up step needs, for each item, the gradient of its mean support loss with respect
to φ = (graph, ID embedding); a meta-training step needs the gradient of the query loss
to everything (φ, the rows' embeddings, the shared weights) and the second-order term of
the inner step. Autograd computes them from a few dozen tiny per-(row, field)
operations; :func:`emerg_kernel` instead compiles one C++ library for the model's shape
and options that runs the forward and the backward of a tile of 16 rows in registers and
L2 (2.5x the ``torch.compile`` warm-up step on one core; with the joint attention
2.6x autograd's warm-up, docs/BENCHMARKS.md). The same templated
code run on dual numbers gives the exact Hessian-vector product. The refinement of the
raw graph (min-max, TopK, powers) stays in torch: it is per item, not per row, and its
derivatives are small autograd calls.

Where no compiler is found or the build fails, :class:`KernelUnavailableError` says why
and ``backend="auto"`` (warm-up, meta-training) falls back to autograd.

Rooms: :mod:`~emerg_stream.meta.kernel.build` compiles and caches the source,
:mod:`~emerg_stream.meta.kernel.library` binds the library to torch,
:mod:`~emerg_stream.meta.kernel.autograd` wraps its passes as autograd nodes. The
package lives in ``meta/`` beside its two drivers (:mod:`emerg_stream.meta.warmup`,
:mod:`emerg_stream.meta.train`): it computes their losses and gradients, reading the
modules of :mod:`emerg_stream.model` but adding none.
"""

from emerg_stream.meta.kernel.autograd import row_loss, support_grad
from emerg_stream.meta.kernel.build import KERNEL_CACHE_ENV, KernelUnavailableError, cache_dir
from emerg_stream.meta.kernel.library import (
    JOINT_LANES,
    EmerGKernel,
    KernelRows,
    KernelWeights,
    emerg_kernel,
    weight_tensors,
)

__all__ = [
    "JOINT_LANES",
    "KERNEL_CACHE_ENV",
    "EmerGKernel",
    "KernelRows",
    "KernelUnavailableError",
    "KernelWeights",
    "cache_dir",
    "emerg_kernel",
    "row_loss",
    "support_grad",
    "weight_tensors",
]
