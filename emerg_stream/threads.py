"""How many compute threads a process may use: the one place that decides it.

A process can run on fewer CPUs than the machine has: its CPU affinity (``taskset``, a
cpuset) names the cores it may run on, and a cgroup CPU quota (a Kubernetes CPU limit,
``docker --cpus``) caps the CPU time it gets per period. Torch, the OpenMP runtime, MKL
and OpenBLAS count the machine's cores instead; in a pod limited to one CPU on a 64-core
node they start 64 threads, and an OpenMP team whose threads are descheduled waits for
them: on a busy machine a job runs several times slower than its fair share of the CPU
(docs/BENCHMARKS.md, "Threads under contention").

The rule (:func:`resolve_threads`)::

    threads = min(affinity CPUs, floor(cgroup quota / period) [at least 1], EMERG_THREADS)

where the quota is the smallest one on the process's cgroup path (cgroup v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); a quota of 1.5 CPUs gives 1 thread.
Without ``EMERG_THREADS`` an ``OMP_NUM_THREADS`` set by the user caps it the same way. A
job with several processes (the worker's ``--members``) gives each process its share
(:func:`threads_per_process`).

:func:`configure_threads` resolves the number once per process, logs it once
(``threads_resolved threads=2 source=affinity``) and applies it: to the environment
(``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` ... for libraries
loaded later and for child processes), to torch's intra-op and inter-op threads, and to
numpy's BLAS through threadpoolctl when it is installed. The OpenMP wait policy is set to
``PASSIVE`` unless the user chose one (measured: docs/BENCHMARKS.md); it takes effect only
when this runs before torch is imported, as the command line does. The CPU kernel of
warm-up and meta-training (:mod:`emerg_stream.meta.kernel`) runs on the calling
thread and has no thread setting of its own.

This module does not import torch at import time (the stream package uses it).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from emerg_stream.errors import ConfigError

__all__ = [
    "THREADS_ENV",
    "ThreadBudget",
    "affinity_cpus",
    "apply_threads",
    "cgroup_cpu_limit",
    "configure_threads",
    "resolve_threads",
    "threads_per_process",
]

log = structlog.get_logger(__name__)

#: The setting that caps the threads (a positive integer).
THREADS_ENV = "EMERG_THREADS"
#: Where cgroup file systems are mounted, and where a process finds its own cgroups.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: Thread-count variables of the native libraries (OpenMP, MKL, OpenBLAS, Accelerate,
#: numexpr), set to the resolved number.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
#: OpenMP wait policy unless the user set one: threads that wait sleep instead of spinning
#: on a core another process needs.
OMP_WAIT_POLICY = "PASSIVE"
#: The ``OMP_NUM_THREADS`` this process wrote (not a user's cap when read back).
_written_omp: str | None = None
#: The user's ``OMP_NUM_THREADS`` that the first write replaced (still the cap after it).
_user_omp: str | None = None


@dataclass(frozen=True)
class ThreadBudget:
    """The compute threads a process may use and where that number came from.

    Args:
        threads: The number (at least 1).
        source: What decided it: ``affinity``, ``cgroup-v2``, ``cgroup-v1``,
            ``EMERG_THREADS``, ``OMP_NUM_THREADS`` or ``flag`` (an explicit option).
        affinity: CPUs in the process's affinity mask.
        quota_cpus: The cgroup CPU quota in CPUs (quota / period), ``None`` if unlimited.
        setting: The cap that was set (``EMERG_THREADS``, else the user's
            ``OMP_NUM_THREADS``), ``None`` if neither.
    """

    threads: int
    source: str
    affinity: int
    quota_cpus: float | None
    setting: int | None


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the CPU count where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _parse_v2(text: str) -> float | None:
    """``cpu.max`` (``"150000 100000"`` or ``"max 100000"``) -> CPUs, None = unlimited."""
    parts = text.split()
    if len(parts) not in (1, 2):
        raise ValueError(f"expected 'QUOTA PERIOD', got {text.strip()!r}")
    if parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) == 2 else 100_000
    if quota <= 0 or period <= 0:
        raise ValueError(f"quota and period must be positive, got {text.strip()!r}")
    return quota / period


def _parse_v1(quota_text: str, period_text: str) -> float | None:
    """``cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu.cfs_period_us`` -> CPUs."""
    quota = int(quota_text.strip())
    if quota < 0:
        return None
    period = int(period_text.strip())
    if quota == 0 or period <= 0:
        raise ValueError(f"quota {quota} / period {period} is not a CPU limit")
    return quota / period


def _own_cgroups(proc_cgroup: Path) -> list[tuple[str, str]]:
    """(controllers, path) per line of ``/proc/self/cgroup``; ``""`` = the v2 hierarchy."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def _dirs_up(base: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory under ``base`` and every parent up to ``base``.

    Only those that exist: inside a container without a cgroup namespace the path names
    the host's hierarchy while ``base`` is already the container's own cgroup.
    """
    rel = [p for p in cgroup_path.strip("/").split("/") if p and p != ".."]
    dirs = [base.joinpath(*rel[:i]) for i in range(len(rel), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def cgroup_cpu_limit(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> tuple[float, str] | None:
    """The tightest cgroup CPU quota on this process's cgroup path, in CPUs.

    Reads cgroup v2 ``cpu.max`` (unified hierarchy mounted at ``root``) and v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (the ``cpu`` controller mounted under
    ``root``, e.g. ``root/cpu,cpuacct``), at the process's own cgroup and every parent.
    A file that cannot be parsed is skipped with a warning (it is the system's, not the
    user's: a job does not refuse to start over it).

    Args:
        root: Where cgroup file systems are mounted (a parameter for tests).
        proc_cgroup: The process's cgroup membership file.

    Returns:
        (CPUs, ``"cgroup-v2"`` or ``"cgroup-v1"``), or None when no quota applies.
    """
    found: list[tuple[float, str]] = []

    def consider(cpus: float | None, source: str) -> None:
        if cpus is not None:
            found.append((cpus, source))

    for controllers, path in _own_cgroups(proc_cgroup):
        if controllers == "":  # cgroup v2
            if not (root / "cgroup.controllers").exists():
                continue  # v2 not mounted at root (hybrid: v1 holds the cpu controller)
            for d in _dirs_up(root, path):
                f = d / "cpu.max"
                try:
                    consider(_parse_v2(f.read_text()), "cgroup-v2")
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as exc:
                    log.warning("cgroup_file_ignored", file=str(f), error=str(exc))
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((controllers, "cpu,cpuacct", "cpuacct,cpu", "cpu")):
                base = root / mount
                if not base.is_dir():
                    continue
                for d in _dirs_up(base, path):
                    qf, pf = d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"
                    try:
                        consider(_parse_v1(qf.read_text(), pf.read_text()), "cgroup-v1")
                    except FileNotFoundError:
                        continue
                    except (OSError, ValueError) as exc:
                        log.warning("cgroup_file_ignored", file=str(qf), error=str(exc))
                break
    return min(found) if found else None


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, not {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


def _omp_cap(raw: str) -> int | None:
    """The user's ``OMP_NUM_THREADS`` (its outer level: ``"4,2"`` -> 4); None if unusable."""
    try:
        value = int(raw.split(",")[0].strip())
    except ValueError:
        value = 0
    if value < 1:
        log.warning("omp_num_threads_ignored", value=raw)
        return None
    return value


def _users_omp(env: Mapping[str, str]) -> str:
    """The user's ``OMP_NUM_THREADS`` ("" if none).

    The one in ``env``, unless this process wrote it: then the one the user had set before
    that (a second resolution in one process keeps the user's cap).
    """
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if env is os.environ and _written_omp is not None and omp == _written_omp:
        return (_user_omp or "").strip()
    return omp


def resolve_threads(
    explicit: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> ThreadBudget:
    """The compute threads this process may use (the rule is in the module docstring).

    Args:
        explicit: A number given on a command line (``--threads``); it replaces the
            setting as the cap, still bounded by what the process may run on.
        env: The environment to read ``EMERG_THREADS`` / ``OMP_NUM_THREADS`` from
            (default ``os.environ``).
        cgroup_root: Where cgroup file systems are mounted.
        proc_cgroup: The process's cgroup membership file.
        affinity: CPUs in the affinity mask (default: this process's).

    Raises:
        ConfigError: ``EMERG_THREADS`` or ``explicit`` is not a positive integer.
    """
    env = os.environ if env is None else env
    cpus = affinity_cpus() if affinity is None else affinity
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    threads, source = cpus, "affinity"
    quota_cpus = None
    if limit is not None:
        quota_cpus = limit[0]
        quota_threads = max(1, math.floor(quota_cpus))
        if quota_threads < threads:
            threads, source = quota_threads, limit[1]
    setting: int | None = None
    setting_name = ""
    if explicit is not None:
        setting, setting_name = _positive_int("--threads", str(explicit)), "flag"
    elif env.get(THREADS_ENV, "").strip():
        setting, setting_name = _positive_int(THREADS_ENV, env[THREADS_ENV]), THREADS_ENV
    elif omp := _users_omp(env):
        setting, setting_name = _omp_cap(omp), "OMP_NUM_THREADS"
    if setting is not None:
        if setting < threads:
            threads, source = setting, setting_name
        elif setting > threads:
            log.warning(
                "threads_setting_capped",
                setting=setting,
                setting_from=setting_name,
                usable=threads,
                usable_from=source,
            )
    return ThreadBudget(threads, source, cpus, quota_cpus, setting)


def threads_per_process(budget: ThreadBudget, processes: int) -> int:
    """Each process's share when a job runs ``processes`` of them (at least 1)."""
    return max(1, budget.threads // max(1, processes))


def apply_threads(
    threads: int, env: MutableMapping[str, str] | None = None, *, load_torch: bool = True
) -> None:
    """Run this process's compute on ``threads`` threads.

    Sets the native libraries' variables (effective for a library loaded later and for
    child processes), the OpenMP wait policy unless one is set (effective only before
    torch is imported), torch's intra-op threads and, before any inter-op work has
    started, its inter-op threads; Arrow's CPU pool when pyarrow is loaded; numpy's BLAS
    through threadpoolctl when numpy is loaded already and threadpoolctl is installed.

    Args:
        threads: The number of threads.
        env: The environment to write (default ``os.environ``).
        load_torch: Import torch to apply the number (else only when already imported).
    """
    global _written_omp, _user_omp
    env = os.environ if env is None else env
    if env is os.environ and _written_omp is None:
        _user_omp = env.get("OMP_NUM_THREADS")
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    if env is os.environ:
        _written_omp = str(threads)
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    if load_torch or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != threads:
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError as exc:  # inter-op work already ran: the pool is fixed
                log.debug("interop_threads_unchanged", threads=threads, error=str(exc))
    if "pyarrow" in sys.modules:
        import pyarrow

        pyarrow.set_cpu_count(threads)
    if "numpy" in sys.modules:  # loaded before the variables were set: limit its BLAS now
        try:
            threadpoolctl = importlib.import_module("threadpoolctl")
        except ImportError:
            return
        threadpoolctl.threadpool_limits(limits=threads)


_configured: tuple[ThreadBudget, int] | None = None


def configure_threads(
    explicit: int | None = None,
    *,
    processes: int = 1,
    per_process_max: int | None = None,
    load_torch: bool = True,
    name: str = "threads_resolved",
) -> ThreadBudget:
    """Resolve this process's threads, log where they came from, and apply them.

    Resolved and logged once per process; a later call with another ``explicit`` or
    ``processes`` re-applies (a benchmark's ``--threads``, a worker member's share).

    Args:
        explicit: A number from a command line (see :func:`resolve_threads`).
        processes: Processes of the job that share the budget (each gets its share).
        per_process_max: At most this many threads in this process, whatever its share
            (the worker's ``--torch-threads``).
        load_torch: Import torch to apply the number (a job that never uses torch
            passes False; torch then reads ``OMP_NUM_THREADS`` if it is imported later).
        name: The log event.

    Returns:
        The budget; the threads applied are ``threads_per_process(budget, processes)``,
        at most ``per_process_max``.

    Raises:
        ConfigError: A bad ``EMERG_THREADS``, ``explicit`` or ``per_process_max``.
    """
    global _configured
    budget = resolve_threads(explicit)
    applied = threads_per_process(budget, processes)
    if per_process_max is not None:
        applied = min(applied, _positive_int("threads per process", str(per_process_max)))
    if (budget, applied) != _configured:
        log.info(
            name,
            threads=applied,
            source=budget.source,
            usable=budget.threads,
            processes=processes,
            affinity=budget.affinity,
            quota_cpus=budget.quota_cpus,
            setting=budget.setting,
        )
    _configured = (budget, applied)
    apply_threads(applied, load_torch=load_torch)
    return budget
