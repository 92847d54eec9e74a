"""Independent units of an offline job in worker processes, the thread budget split.

``reproduce`` spends its time in units that share nothing but read-only inputs: the
selection of each method (of each of EmerG's structures) and the final run of each
(method, seed). Small CTR models keep two intra-op threads busy only part of the time
(docs/BENCHMARKS.md, "Threads under contention": two threads take 0.71-0.82x of one
thread's time), so on a 2-core box two processes of one thread each finish such units
sooner than one process of two threads. :func:`run_units` runs ``fn(shared, unit)`` for
every unit, in worker processes (``spawn``: no forked torch state) each given its share
of the thread budget (:func:`emerg_stream.threads.threads_per_process`), or in this
process when ``processes`` is 1. The shared inputs are pickled once per worker.

Results come back in the order of ``units``; the first unit that raises stops the job
with its error (the others are cancelled or run to their end, their results dropped).
Units should be submitted longest first: the pool hands them out in that order.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

import structlog

S = TypeVar("S")
U = TypeVar("U")
R = TypeVar("R")

log = structlog.get_logger(__name__)

_shared: Any = None


def _init(threads: int, shared: Any, log_json: bool | None) -> None:
    """A worker process's start: its threads, the shared inputs, the log format."""
    global _shared
    from emerg_stream.logging import configure_logging
    from emerg_stream.threads import apply_threads

    configure_logging(json=log_json)
    apply_threads(threads)
    _shared = shared


def _call(fn: Callable[[Any, Any], Any], unit: Any) -> Any:
    return fn(_shared, unit)


def run_units(
    fn: Callable[[S, U], R],
    shared: S,
    units: Sequence[U],
    *,
    processes: int = 1,
    threads: int = 1,
    log_json: bool | None = None,
    progress: str | None = None,
) -> list[R]:
    """``[fn(shared, u) for u in units]``, on up to ``processes`` worker processes.

    Args:
        fn: A module-level function (it is pickled by name).
        shared: The read-only inputs every unit needs (pickled once per worker).
        units: The units, longest first.
        processes: Worker processes; 1 runs every unit here, in order.
        threads: Compute threads of each worker process.
        log_json: The workers' log format (``None``: JSON unless stderr is a terminal).
        progress: With worker processes, a progress bar of the units done, with this
            label (the units' own bars are off in the workers); ``None``: no bar.
    """
    n = min(processes, len(units))
    if n <= 1:
        return [fn(shared, u) for u in units]
    log.info("units_in_processes", units=len(units), processes=n, threads_each=threads)
    with ProcessPoolExecutor(
        max_workers=n,
        mp_context=mp.get_context("spawn"),
        initializer=_init,
        initargs=(threads, shared, log_json),
    ) as pool:
        futures = [pool.submit(_call, fn, u) for u in units]
        try:
            if progress is not None:
                from tqdm.auto import tqdm

                with tqdm(total=len(futures), desc=progress, unit="unit") as bar:
                    for done in as_completed(futures):
                        done.result()  # the first failure stops the job here
                        bar.update(1)
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
