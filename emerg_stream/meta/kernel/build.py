"""Compile the kernel's C++ source for one model shape, once, into a cache; say why not.

The source (``emerg_grad.cpp`` beside this module) is compiled on first use with the
system C++ compiler (``$CXX``, else ``c++``) for the host CPU (``-march=native``), once
per set of compile-time switches, into a cache directory (``$EMERG_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/emerg-stream/kernels``, else ``~/.cache/emerg-stream/kernels``); the
library's name hashes the source, the flags, the compiler's version and the CPU, so
later processes load it. Where no compiler is found or the build fails,
:class:`KernelUnavailableError` says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["KERNEL_CACHE_ENV", "KernelUnavailableError", "build", "cache_dir"]

#: Environment variable naming the folder of compiled kernels.
KERNEL_CACHE_ENV = "EMERG_KERNEL_CACHE"
_SOURCE = "emerg_grad.cpp"
_FLAGS = ("-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-Wno-psabi") + (
    # one 16-lane float tile = one AVX-512 register where the CPU has them
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)


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
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailableError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    return path


def build(defines: tuple[str, ...]) -> Path:
    """Compile the kernel for ``defines`` into the cache (once) and return the library."""
    source = resources.files("emerg_stream.meta.kernel").joinpath(_SOURCE).read_bytes()
    cxx = _compiler()
    try:
        version = subprocess.run(  # noqa: S603 - the operator's compiler ($CXX)
            [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailableError(f"C++ compiler {cxx} does not run: {exc}") from exc
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
    out = cache_dir() / f"emerg_grad-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        lib = Path(tmp) / out.name
        cmd = [cxx, *_FLAGS, *defines, str(src), "-o", str(lib), "-lm"]
        try:
            res = subprocess.run(  # noqa: S603 - the operator's compiler ($CXX)
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
