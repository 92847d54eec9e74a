"""EmerG's warm-up gradient as a compiled CPU kernel (``kernels/phi_grad.c``).

A warm-up step needs, for each item, the gradient of its mean support loss with respect
to φ = (graph, ID embedding). Autograd computes it from a few dozen tiny per-(row, field)
operations; :func:`phi_grad_kernel` instead compiles one C function for the model's
shape that runs the forward and the backward of a tile of 16 rows in registers and L2
(2.5x the ``torch.compile`` step on one core, docs/BENCHMARKS.md). The refinement of the
raw graph (min-max, TopK, powers) stays in torch: it is per item, not per row, and its
backward is a small autograd call.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``)
for the host CPU (``-march=native``), once per model shape and real type, into a cache
directory (``$EMERG_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/emerg-stream/kernels``, else
``~/.cache/emerg-stream/kernels``); later processes load the cached library. Where no
compiler is found or the build fails, :class:`KernelUnavailableError` says why and
``warm_up(backend="auto")`` falls back to autograd.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from emerg_stream.model.base import ItemModel
from emerg_stream.model.emerg import EmerG

#: Environment variable naming the folder of compiled kernels.
KERNEL_CACHE_ENV = "EMERG_KERNEL_CACHE"
_SOURCE = "phi_grad.c"
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-Wno-psabi") + (
    # one 16-lane float tile = one AVX-512 register where the CPU has them
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)
_DTYPES = {torch.float32: "float", torch.float64: "double"}


class KernelUnavailableError(RuntimeError):
    """The CPU kernel cannot serve this model, dtype or machine (the message says why).

    Args:
        reason: What is missing.
        machine: The machine is the reason (no compiler, a failed build): worth a
            warning where the kernel was expected, unlike a model or device it does
            not cover.
    """

    def __init__(self, reason: str, *, machine: bool = True) -> None:
        super().__init__(reason)
        self.machine = machine


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if env := os.environ.get(KERNEL_CACHE_ENV):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emerg-stream" / "kernels"


def _cpu_fingerprint() -> str:
    """The host CPU's model and flags: a ``-march=native`` build is only valid on it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise KernelUnavailableError(f"no C compiler: {cc!r} is not on PATH (set CC)")
    return path


def _build(defines: tuple[str, ...]) -> Path:
    """Compile the kernel for ``defines`` into the cache (once) and return the library."""
    source = resources.files("emerg_stream.model").joinpath("kernels", _SOURCE).read_bytes()
    cc = _compiler()
    try:
        version = subprocess.run(  # noqa: S603 - the operator's compiler ($CC)
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailableError(f"C compiler {cc} does not run: {exc}") from exc
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join((*_FLAGS, *defines)).encode(),
                version.encode(),
                _cpu_fingerprint().encode(),
            ]
        )
    ).hexdigest()[:20]
    out = cache_dir() / f"phi_grad-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        lib = Path(tmp) / out.name
        cmd = [cc, *_FLAGS, *defines, str(src), "-o", str(lib), "-lm"]
        try:
            res = subprocess.run(  # noqa: S603 - the operator's compiler ($CC)
                cmd, capture_output=True, text=True, timeout=300, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailableError(f"compiling the kernel failed: {exc}") from exc
        if res.returncode != 0:
            raise KernelUnavailableError(
                f"compiling the kernel failed ({' '.join(cmd)}): {res.stderr.strip()[-2000:]}"
            )
        os.replace(lib, out)  # atomic: a concurrent build of the same key is harmless
    return out


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass(frozen=True)
class KernelWeights:
    """EmerG's shared parameters in the kernel's order and float type.

    Args:
        tensors: W_l stacked ``[L, D, D]``, M ``[H*D, D]``, N ``[D, H*D]``, the output
            bias ``[D]``, the contribution weights ``[F, F*D]`` and bias ``[F]``, the
            prediction weights ``[D]``; contiguous.
        bias: The prediction bias.
    """

    tensors: tuple[Tensor, ...]
    bias: float


class PhiGradKernel:
    """The compiled gradient of one model shape and real type.

    Args:
        library: Path of the compiled shared library.
        dtype: ``torch.float32`` or ``torch.float64``.
    """

    def __init__(self, library: Path, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._lib = ctypes.CDLL(str(library))
        self._fn = self._lib.emerg_phi_grad
        self._fn.restype = ctypes.c_double

    def weights(self, model: EmerG) -> KernelWeights:
        """The model's shared parameters as the kernel reads them (folded, contiguous).

        Warm-up computes them once per chunk and passes them to every step's call.
        """
        with torch.no_grad():
            m, n = model.attention.folded_weights()
            tensors = [
                torch.stack([cast(nn.Linear, w).weight for w in model.interaction.weights]),
                m,
                n,
                model.attention.out.bias,
                model.predictor.contrib.weight,
                model.predictor.contrib.bias,
                model.predictor.w.weight[0],
            ]
            return KernelWeights(
                tuple(t.detach().to(self.dtype).contiguous() for t in tensors),
                float(model.predictor.b),
            )

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

        The loss is Σ_rows inv_count[row] · BCE(logit, label): with ``inv_count`` one
        over the row's item's number of rows, the sum over items of each item's mean
        loss (``per_item_mean_loss(...).sum()``).

        Args:
            model: The EmerG whose shared parameters are read (never written).
            e_rest: ``[B, F-1, D]`` embeddings of fields 1..F-1 (``prepare``'s "e").
            graphs: ``[I, L, F, F]`` refined graphs (``model.graphs(φ["adj"])``).
            id_emb: ``[I, D]`` φ["id"].
            item: ``[B]`` long, each row's item in ``0..I-1``.
            labels: ``[B]`` 0/1.
            inv_count: ``[B]`` weight of each row's loss (0 ignores the row).
            weights: ``self.weights(model)`` when the caller has it (the model's shared
                parameters unchanged since); computed here otherwise.

        Returns:
            (loss, ∂loss/∂graphs ``[I, L, F, F]``, ∂loss/∂id_emb ``[I, D]``).
        """
        b, n_items = item.shape[0], id_emb.shape[0]
        cfg = model.config
        if e_rest.shape != (b, cfg.n_fields - 1, cfg.dim):
            raise ValueError(f"e_rest has shape {tuple(e_rest.shape)}, rows {b}")
        if graphs.shape != (n_items, cfg.layers, cfg.n_fields, cfg.n_fields):
            raise ValueError(f"graphs has shape {tuple(graphs.shape)} for {n_items} items")
        if b and (int(item.min()) < 0 or int(item.max()) >= n_items):
            raise ValueError(f"row items must lie in [0, {n_items})")
        dt = self.dtype
        if weights is None:
            weights = self.weights(model)
        rows = [
            e_rest.detach().to(dt).contiguous(),
            item.to(torch.int64).contiguous(),
            labels.detach().to(dt).contiguous(),
            inv_count.detach().to(dt).contiguous(),
        ]
        graphs = graphs.detach().to(dt).contiguous()
        id_emb = id_emb.detach().to(dt).contiguous()
        d_graphs = torch.zeros_like(graphs)
        d_id = torch.zeros_like(id_emb)
        with torch.profiler.record_function("emerg_phi_grad_kernel"):
            loss = self._fn(
                ctypes.c_int64(b),
                *[_ptr(t) for t in rows],
                _ptr(graphs),
                _ptr(id_emb),
                *[_ptr(p) for p in weights.tensors],
                ctypes.c_double(weights.bias),
                _ptr(d_graphs),
                _ptr(d_id),
            )
        if loss != loss:  # NaN: the kernel could not allocate its scratch
            raise MemoryError("the warm-up kernel could not allocate its scratch")
        return float(loss), d_graphs, d_id


_LOCK = threading.Lock()
_KERNELS: dict[tuple[object, ...], PhiGradKernel | KernelUnavailableError] = {}


def phi_grad_kernel(model: ItemModel, dtype: torch.dtype, device: torch.device) -> PhiGradKernel:
    """The kernel for ``model``'s shape and ``dtype``, built on first use (thread-safe).

    Raises:
        KernelUnavailableError: Not an EmerG, not on the CPU, not float32/float64, an
            activation the kernel does not know, no C compiler, or the build failed
            (a failure is remembered: the build is not retried in this process).
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
    if cfg.activation not in ("relu", "identity"):
        raise KernelUnavailableError(f"unknown activation {cfg.activation!r}", machine=False)
    defines = (
        f"-DNF={cfg.n_fields}",
        f"-DND={cfg.dim}",
        f"-DNL={cfg.layers}",
        f"-DNH={cfg.heads}",
        f"-DRELU={int(cfg.activation == 'relu')}",
        f"-DREAL={_DTYPES[dtype]}",
        f"-DREAL_IS_DOUBLE={int(dtype == torch.float64)}",
    )
    with _LOCK:
        got = _KERNELS.get(defines)
        if got is None:
            try:
                got = PhiGradKernel(_build(defines), dtype)
            except KernelUnavailableError as exc:
                got = exc
            except OSError as exc:  # the cached library does not load
                got = KernelUnavailableError(f"loading the kernel failed: {exc}")
            _KERNELS[defines] = got
    if isinstance(got, KernelUnavailableError):
        raise got
    return got
