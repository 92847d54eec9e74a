"""The compiled kernel bound to torch: EmerG's shared weights, the rows, the three passes.

:class:`EmerGKernel` loads one compiled library (:mod:`~emerg_stream.meta.kernel.build`)
and calls its passes on torch tensors: φ's gradient for warm-up (:meth:`EmerGKernel.phi_grad`),
the full gradient and the Hessian-vector product for meta-training.
:func:`emerg_kernel` builds (once per process and shape) the kernel a model needs.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from emerg_stream.meta.kernel.build import KernelUnavailableError, build
from emerg_stream.model.base import ItemModel
from emerg_stream.model.emerg import EmerG
from emerg_stream.model.interaction import JointAttention, OrderAttention

_DTYPES = {torch.float32: "float", torch.float64: "double"}
#: The source's ACT switch per activation.
_ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2}
#: Rows per tile with joint attention (per-field attention: 16). Its tile holds H x (O F)^2
#: attention weights and the O F tokens' queries, keys and values per row (~1 MB in float32
#: on ML-1M's shape); still, 16 was 1.5x 8 and 6x 32 on its warm-up (docs/BENCHMARKS.md).
JOINT_LANES = 16


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass(frozen=True)
class KernelWeights:
    """EmerG's shared parameters in the kernel's order and float type.

    Args:
        tensors: :func:`weight_tensors`' list but its last entry, contiguous.
        bias: The prediction bias.
    """

    tensors: tuple[Tensor, ...]
    bias: float


def weight_tensors(model: EmerG) -> list[Tensor]:
    """The shared parameters the kernel reads, in its order, as differentiable tensors.

    The kernel's entry points take them in this order (``WEIGHT_ARGS`` in the source)
    and return their gradients flat in the same order:

    1. W_l stacked ``[L, D, D]``;
    2. the attention's maps: for per-field attention (:class:`OrderAttention`) the
       folded M ``[H*D, D]`` and N ``[D, H*D]``; for joint attention
       (:class:`JointAttention`, head size a) Wq ``[F*H*a, F*D]``, Wk ``[F*H*a, F*D]``,
       Wv ``[H*a, D]`` and Wout ``[D, H*a]``, the Linear weights themselves;
    3. the attention's output bias ``[D]``, the contribution weights ``[F, F*D]`` and
       bias ``[F]``, the prediction weights ``[D]``, the first-order weights ``[F*D]``
       (``linear`` models only) and the prediction bias (0-d).

    Gradients to these flow back to the model's parameters through the stacking and
    the folding.
    """
    attention = model.attention
    if isinstance(attention, OrderAttention):
        maps = list(attention.folded_weights())
    elif isinstance(attention, JointAttention):
        maps = [attention.q.weight, attention.k.weight, attention.v.weight, attention.out.weight]
    else:  # pragma: no cover - EmerG builds one of the two
        raise KernelUnavailableError(f"unknown attention {type(attention).__name__}", machine=False)
    return [
        torch.stack([cast(nn.Linear, w).weight for w in model.interaction.weights]),
        *maps,
        attention.out.bias,
        model.predictor.contrib.weight,
        model.predictor.contrib_bias_or_zero,
        model.predictor.w.weight[0],
        *([model.first_order.weight[0]] if model.first_order is not None else []),
        model.predictor.b,
    ]


@dataclass(frozen=True)
class KernelRows:
    """Rows as the kernel reads them: each row's item, label and loss weight.

    Args:
        item: ``[B]`` long, each row's item in ``0..I-1``.
        labels: ``[B]`` 0/1.
        inv_count: ``[B]`` weight of each row's loss (0 ignores the row): one over the
            row's item's number of rows gives the sum over items of each item's mean loss
            (``per_item_mean_loss(...).sum()``).
        tokens: ``[B, F-1, T]`` the tokens of fields 1..F-1 (everything but the id),
            for the calls that embed the rows themselves (meta-training: the table's
            gradient is accumulated in the kernel, no per-row embeddings in torch).
        token_weights: ``[B, F-1, T]`` their weights.
    """

    item: Tensor
    labels: Tensor
    inv_count: Tensor
    tokens: Tensor | None = None
    token_weights: Tensor | None = None


class EmerGKernel:
    """The compiled loss derivatives of one model shape and real type.

    Every call computes the loss Σ_rows inv_count[row] · BCE(logit, label) of EmerG's
    forward over rows whose φ is their item's (refined graphs, ID embedding). The other
    fields' embeddings are given (``e_rest``, warm-up: computed once per phase) or
    computed by the kernel from the rows' tokens and the embedding table.

    Args:
        library: Path of the compiled shared library.
        dtype: ``torch.float32`` or ``torch.float64``.
    """

    def __init__(self, library: Path, dtype: torch.dtype, *, bf16: bool = False) -> None:
        self.dtype = dtype
        self.bf16 = bf16
        self._lib = ctypes.CDLL(str(library))
        self._phi = self._lib.emerg_phi_grad
        self._full = self._lib.emerg_full_grad
        self._hvp = self._lib.emerg_hvp
        self._logits = self._lib.emerg_logits
        for fn in (self._phi, self._full, self._hvp, self._logits):
            fn.restype = ctypes.c_double
        self.n_weights = int(self._lib.emerg_n_weights())
        if bf16 and not self._lib.emerg_mma_ready():
            raise KernelUnavailableError("the OS did not grant this process the AMX tile state")

    def weights(self, model: EmerG) -> KernelWeights:
        """The model's shared parameters as the kernel reads them (folded, contiguous).

        Warm-up computes them once per chunk and passes them to every step's call.
        """
        with torch.no_grad():
            return self.weights_of(weight_tensors(model))

    def weights_of(self, tensors: list[Tensor]) -> KernelWeights:
        """:class:`KernelWeights` from :func:`weight_tensors`' list (detached)."""
        *main, bias = tensors
        return KernelWeights(
            tuple(t.detach().to(self.dtype).contiguous() for t in main), float(bias.detach())
        )

    def _args(
        self,
        model: EmerG,
        graphs: Tensor,
        id_emb: Tensor,
        rows: KernelRows,
        e_rest: Tensor | None,
        table: Tensor | None,
        *,
        labelled: bool = True,
    ) -> tuple[list[object], list[Tensor]]:
        """The C arguments from ``nrows`` to ``id``, checked; and the tensors they point to.

        The rows' other fields come from ``e_rest`` if given, else from ``rows.tokens``
        and ``table``. ``labelled=False`` leaves out the labels and loss weights (the
        forward-only entry reads neither).
        """
        b, n_items = rows.item.shape[0], id_emb.shape[0]
        cfg = model.config
        if graphs.shape != (n_items, cfg.layers, cfg.n_fields, cfg.n_fields):
            raise ValueError(f"graphs has shape {tuple(graphs.shape)} for {n_items} items")
        if id_emb.shape != (n_items, cfg.dim):
            raise ValueError(f"id_emb has shape {tuple(id_emb.shape)}, not ({n_items}, {cfg.dim})")
        if rows.labels.shape != (b,) or rows.inv_count.shape != (b,):
            raise ValueError(f"labels and inv_count must have one entry per row ({b})")
        if b and (int(rows.item.min()) < 0 or int(rows.item.max()) >= n_items):
            raise ValueError(f"row items must lie in [0, {n_items})")
        dt = self.dtype
        keep: list[Tensor] = []

        def ptr(t: Tensor | None, dtype: torch.dtype | None = None) -> ctypes.c_void_p:
            if t is None:
                return ctypes.c_void_p(None)
            t = t.detach().to(dtype or dt).contiguous()
            keep.append(t)
            return _ptr(t)

        if e_rest is not None:
            if e_rest.shape != (b, cfg.n_fields - 1, cfg.dim):
                raise ValueError(f"e_rest has shape {tuple(e_rest.shape)}, rows {b}")
            fields = [ptr(e_rest), ptr(None), ptr(None), ptr(None), ctypes.c_int64(0)]
        else:
            if rows.tokens is None or rows.token_weights is None or table is None:
                raise ValueError("without e_rest the rows' tokens and the table are needed")
            if rows.tokens.shape[:2] != (b, cfg.n_fields - 1):
                raise ValueError(f"tokens has shape {tuple(rows.tokens.shape)}, rows {b}")
            if rows.token_weights.shape != rows.tokens.shape:
                raise ValueError("token weights and tokens differ in shape")
            if b and (int(rows.tokens.min()) < 0 or int(rows.tokens.max()) >= table.shape[0]):
                raise ValueError(f"tokens must lie in [0, {table.shape[0]})")
            fields = [
                ptr(None),
                ptr(rows.tokens, torch.int64),
                ptr(rows.token_weights),
                ptr(table),
                ctypes.c_int64(rows.tokens.shape[2]),
            ]
        head: list[object] = [
            ctypes.c_int64(b),
            *fields,
            ptr(rows.item, torch.int64),
            *((ptr(rows.labels), ptr(rows.inv_count)) if labelled else ()),
            ptr(graphs),
            ptr(id_emb),
        ]
        return head, keep

    def __call__(
        self,
        model: EmerG,
        e_rest: Tensor,
        graphs: Tensor,
        id_emb: Tensor,
        item: Tensor,
        labels: Tensor,
        inv_count: Tensor,
        weights: KernelWeights | None = None,
    ) -> tuple[float, Tensor, Tensor]:
        """The loss and its gradients to the items' refined graphs and ID embeddings.

        Args:
            model: The EmerG whose shared parameters are read (never written).
            e_rest: ``[B, F-1, D]`` embeddings of fields 1..F-1 (``prepare``'s "e").
            graphs: ``[I, L, F, F]`` refined graphs (``model.graphs(φ["adj"])``).
            id_emb: ``[I, D]`` φ["id"].
            item: ``[B]`` long, each row's item in ``0..I-1``.
            labels: ``[B]`` 0/1.
            inv_count: ``[B]`` weight of each row's loss (see :class:`KernelRows`).
            weights: ``self.weights(model)`` when the caller has it (the model's shared
                parameters unchanged since); computed here otherwise.

        Returns:
            (loss, ∂loss/∂graphs ``[I, L, F, F]``, ∂loss/∂id_emb ``[I, D]``).
        """
        rows = KernelRows(item, labels, inv_count)
        return self.phi_grad(model, graphs, id_emb, rows, weights, e_rest=e_rest)

    def phi_grad(
        self,
        model: EmerG,
        graphs: Tensor,
        id_emb: Tensor,
        rows: KernelRows,
        weights: KernelWeights | None = None,
        *,
        e_rest: Tensor | None = None,
        table: Tensor | None = None,
    ) -> tuple[float, Tensor, Tensor]:
        """:meth:`__call__` with the other fields given either way (see :meth:`_args`)."""
        head, _keep = self._args(model, graphs, id_emb, rows, e_rest, table)
        if weights is None:
            weights = self.weights(model)
        d_graphs, d_id = self._zeros(graphs), self._zeros(id_emb)
        with torch.profiler.record_function("emerg_phi_grad_kernel"):
            loss = self._phi(*head, *self._weight_args(weights), _ptr(d_graphs), _ptr(d_id))
        return _checked(loss), d_graphs, d_id

    def logits(
        self,
        model: EmerG,
        graphs: Tensor,
        id_emb: Tensor,
        item: Tensor,
        weights: KernelWeights | None = None,
        *,
        e_rest: Tensor | None = None,
        tokens: Tensor | None = None,
        token_weights: Tensor | None = None,
        table: Tensor | None = None,
    ) -> Tensor:
        """EmerG's logits of the rows, the forward alone (scoring), ``[B]``.

        The rows' other fields come from ``e_rest`` (``[B, F-1, D]``) or from their
        ``tokens`` and ``token_weights`` (``[B, F-1, T]``) and the embedding ``table``.
        """
        zeros = torch.zeros(item.shape[0], dtype=self.dtype)
        rows = KernelRows(item, zeros, zeros, tokens, token_weights)
        head, _keep = self._args(model, graphs, id_emb, rows, e_rest, table, labelled=False)
        if weights is None:
            weights = self.weights(model)
        out = torch.empty(item.shape[0], dtype=self.dtype)
        with torch.profiler.record_function("emerg_logits_kernel"):
            status = self._logits(*head, *self._weight_args(weights), _ptr(out))
        _checked(status)
        return out

    def full_grad(
        self,
        model: EmerG,
        graphs: Tensor,
        id_emb: Tensor,
        rows: KernelRows,
        table: Tensor,
        weights: KernelWeights,
    ) -> tuple[float, list[Tensor]]:
        """The loss and its gradient to every input (meta-training's query loss).

        The rows carry their tokens (:class:`KernelRows`); the kernel embeds them.

        Returns:
            (loss, [∂/∂graphs ``[I, L, F, F]``, ∂/∂id_emb ``[I, D]``, ∂/∂table
            ``[V, D]``, then one per :func:`weight_tensors` entry, in its shape]).
        """
        head, _keep = self._args(model, graphs, id_emb, rows, None, table)
        outs = self._outputs(graphs, id_emb, table)
        with torch.profiler.record_function("emerg_full_grad_kernel"):
            loss = self._full(*head, *self._weight_args(weights), *[_ptr(t) for t in outs])
        return _checked(loss), self._split(outs, weights)

    def hvp(
        self,
        model: EmerG,
        graphs: Tensor,
        id_emb: Tensor,
        rows: KernelRows,
        table: Tensor,
        weights: KernelWeights,
        direction: tuple[Tensor, Tensor],
    ) -> list[Tensor]:
        """The derivative of :meth:`full_grad`'s gradients along a direction in φ.

        With ``direction = (v_graphs, v_id)`` this is the Hessian of the loss times
        that vector, each block the gradient of ⟨∂loss/∂(graphs, id), v⟩ with respect to
        an input: exactly what a double backward through the inner step of
        meta-training needs. Forward-mode through the backward (dual numbers), exact.

        Returns:
            The same list as :meth:`full_grad`'s gradients.
        """
        head, _keep = self._args(model, graphs, id_emb, rows, None, table)
        v_graphs, v_id = (t.detach().to(self.dtype).contiguous() for t in direction)
        if v_graphs.shape != graphs.shape or v_id.shape != id_emb.shape:
            raise ValueError("the direction must have the shapes of (graphs, id_emb)")
        outs = self._outputs(graphs, id_emb, table)
        with torch.profiler.record_function("emerg_hvp_kernel"):
            loss = self._hvp(
                *head,
                _ptr(v_graphs),
                _ptr(v_id),
                *self._weight_args(weights),
                *[_ptr(t) for t in outs],
            )
        _checked(loss)
        return self._split(outs, weights)

    def _zeros(self, like: Tensor) -> Tensor:
        return torch.zeros(like.shape, dtype=self.dtype)

    @staticmethod
    def _weight_args(weights: KernelWeights) -> list[object]:
        return [*[_ptr(p) for p in weights.tensors], ctypes.c_double(weights.bias)]

    def _outputs(self, graphs: Tensor, id_emb: Tensor, table: Tensor) -> list[Tensor]:
        """Zeroed d_graphs, d_id, d_table and the flat weight gradient."""
        return [
            self._zeros(graphs),
            self._zeros(id_emb),
            self._zeros(table),
            torch.zeros(self.n_weights, dtype=self.dtype),
        ]

    @staticmethod
    def _split(outs: list[Tensor], weights: KernelWeights) -> list[Tensor]:
        *head, flat = outs
        sizes = [t.numel() for t in weights.tensors] + [1]
        parts = torch.split(flat, sizes)
        shaped = [p.view_as(t) for p, t in zip(parts, weights.tensors, strict=False)]
        return [*head, *shaped, parts[-1].view(())]


def _checked(loss: float) -> float:
    if loss == float("-inf"):  # a loss is never negative: the kernel's out-of-memory mark
        raise MemoryError("the CPU kernel could not allocate its scratch")
    return float(loss)


_LOCK = threading.Lock()
_KERNELS: dict[tuple[object, ...], EmerGKernel | KernelUnavailableError] = {}


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU reports AMX-BF16 and AVX512-BF16 (Linux ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
    return {"amx_bf16", "amx_tile", "avx512_bf16"} <= set(flags)


def emerg_kernel(
    model: ItemModel, dtype: torch.dtype, device: torch.device, *, bf16: bool = False
) -> EmerGKernel:
    """The kernel for ``model``'s shape and ``dtype``, built on first use (thread-safe).

    Every EmerG option is compiled in (activation, linear last layer, per-field or
    joint attention, FM term, first-order term; see the source's switches).

    Args:
        model: The EmerG.
        dtype: ``torch.float32`` or ``torch.float64``.
        device: The CPU.
        bf16: The joint attention's query and key products (two thirds of its
            multiply-adds) as bfloat16 tile products with float32 sums, on Intel AMX
            (the source's ``MMA`` switch), in the plain passes (φ-gradient and full
            gradient; the Hessian-vector pass keeps float32): joint attention, float32,
            D and H·a multiples of 16.

    Raises:
        KernelUnavailableError: Not an EmerG, not on the CPU, not float32/float64, an
            activation the kernel does not know, no C++ compiler, or the build failed
            (a failure is remembered: the build is not retried in this process); with
            ``bf16``, also a model or CPU it does not serve.
    """
    if not isinstance(model, EmerG):
        raise KernelUnavailableError(
            f"the kernel computes EmerG's gradient, not {type(model).__name__}'s", machine=False
        )
    if device.type != "cpu":
        raise KernelUnavailableError(f"the kernel runs on the CPU, not on {device}", machine=False)
    if dtype not in _DTYPES:
        raise KernelUnavailableError(
            f"the kernel handles float32 and float64, not {dtype}", machine=False
        )
    cfg = model.config
    if cfg.activation not in _ACTIVATIONS:
        raise KernelUnavailableError(f"unknown activation {cfg.activation!r}", machine=False)
    if cfg.attention not in ("field", "joint"):
        raise KernelUnavailableError(f"unknown attention {cfg.attention!r}", machine=False)
    joint = cfg.attention == "joint"
    if bf16:
        ha = cfg.heads * cfg.head_dim
        if not joint or dtype != torch.float32 or cfg.dim % 16 or ha % 16:
            raise KernelUnavailableError(
                "bfloat16 products serve the joint attention in float32 with D and H*a "
                f"multiples of 16 (attention {cfg.attention!r}, {dtype}, D={cfg.dim}, "
                f"H*a={ha})",
                machine=False,
            )
        if not cpu_has_bf16_tiles():
            raise KernelUnavailableError("this CPU has no AMX-BF16 tile unit")
    defines = (
        f"-DNF={cfg.n_fields}",
        f"-DND={cfg.dim}",
        f"-DNL={cfg.layers}",
        f"-DNH={cfg.heads}",
        f"-DACT={_ACTIVATIONS[cfg.activation]}",
        f"-DLAST={int(cfg.activate_last)}",
        f"-DFM={int(cfg.fm)}",
        f"-DLIN={int(cfg.linear)}",
        f"-DJOINT={int(joint)}",
        *((f"-DNA={cfg.head_dim}", f"-DLANES={JOINT_LANES}") if joint else ()),
        f"-DREAL={_DTYPES[dtype]}",
        f"-DREAL_IS_DOUBLE={int(dtype == torch.float64)}",
        *(("-DMMA=1",) if bf16 else ()),
    )
    with _LOCK:
        got = _KERNELS.get(defines)
        if got is None:
            try:
                got = EmerGKernel(build(defines), dtype, bf16=bf16)
            except KernelUnavailableError as exc:
                got = exc
            except OSError as exc:  # the cached library does not load
                got = KernelUnavailableError(f"loading the kernel failed: {exc}")
            _KERNELS[defines] = got
    if isinstance(got, KernelUnavailableError):
        raise got
    return got
