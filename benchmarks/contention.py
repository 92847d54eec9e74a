"""Threads under contention: one small ``reproduce``, alone and on a busy or limited box.

    python benchmarks/contention.py          # ml-100k, EmerG, 1 seed: ~20-40 min on 2 shared cores
    python benchmarks/contention.py --conditions alone spin1 --variants before after --reps 2
    python benchmarks/contention.py --job worker --variants after --checkpoint CK

``--job worker`` runs the worker's stream throughput instead (``stream_throughput.py
--cases c --reps 1``: the embedded broker, the ml-100k replay produced, then one
:class:`Worker` drains it) and compares the seconds of its drain (case (c)), not the
child's wall time (which includes starting the broker and producing the events). The
worker runs one torch thread per member in every variant (``--torch-threads``' default),
so ``before`` and ``one-thread`` only differ from ``after`` in the environment.

The same command (``emerg-stream reproduce --dataset ml-100k --methods emerg --seeds 1``)
runs as a child process under each *condition*:

- ``alone``: nothing added (other users of a shared box are not controlled: the 1-minute
  load average is recorded at the start and the end of every run);
- ``spin1`` / ``spin3``: beside one / three processes that each keep a core busy, started
  just before the run and killed after it (each also stops by itself after
  ``--spin-max-s``);
- ``pinned``: its affinity set to one core;
- ``quota``: in a new cgroup with a CPU quota of one CPU (v1 ``cpu.cfs_quota_us`` or v2
  ``cpu.max``); it needs write access to the cgroup file system, and is reported as
  skipped, with the reason, where the machine does not give it;

and in each *variant*, interleaved run by run (the order alternates every repetition):

- ``before``: the behaviour before ``emerg_stream/threads.py``: the job's ``run`` called
  without the command line's thread setup, no thread variables in the environment:
  torch's default thread count (the CPUs of the affinity; a cgroup quota unseen) and the
  OpenMP runtime's default wait policy (spin, then sleep);
- ``after``: ``emerg-stream reproduce`` as shipped (the thread rule and
  ``OMP_WAIT_POLICY=PASSIVE``);
- ``one-thread``: the same with ``EMERG_THREADS=1``;
- ``processes``: ``after`` with ``--processes auto`` (``reproduce``'s default; the other
  variants pass ``--processes 1``): the selections and final runs in one worker process
  per usable CPU, one thread each (not in the default list: the default job has one unit
  at a time; give it several methods or seeds with ``--job-arg``).

Ratios compare runs of one invocation: a condition's wall time over the same variant's
``alone`` (the targets of issue 17: beside one busy process at most 2.2x, beside three at
most 2.75x, pinned within 10 % of ``one-thread`` alone), and ``after`` over ``before``.
Not part of ``run_all.py``: it loads the machine on purpose.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    emit,
    header,
    markdown_table,
    setup,
)
from emerg_stream.threads import THREAD_ENV_VARS, THREADS_ENV

CONDITIONS = ("alone", "spin1", "spin3", "pinned", "quota")
VARIANTS = ("before", "after", "one-thread", "processes")
#: Issue 17's targets: slowdown over alone (spin), or over one-thread alone (pinned).
TARGETS = {"spin1": 2.2, "spin3": 2.75, "pinned": 1.10}
JOB = ["--methods", "emerg", "--seeds", "1", "--no-progress", "--device", "cpu"]

#: ``before``: the job run as ``emerg-stream`` ran it before the thread rule existed.
BEFORE_CODE = (
    "import sys\n"
    "from emerg_stream.cli import build_parser\n"
    "from emerg_stream.logging import configure_logging\n"
    "args = build_parser().parse_args(sys.argv[1:])\n"
    "configure_logging(json=True, level=args.log_level)\n"
    "sys.exit(args._run(args))\n"
)
SPIN_CODE = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


def load1() -> float | None:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------ cgroups


class QuotaUnavailableError(RuntimeError):
    """The machine does not let this process create a cgroup with a CPU quota."""


def _own_path(controllers: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctl, path = line.split(":", 2)
        if ctl == controllers or (controllers and controllers in ctl.split(",")):
            return path
    raise QuotaUnavailableError(f"no {controllers or 'v2'} line in /proc/self/cgroup")


@contextlib.contextmanager
def quota_cgroup(cpus: float, root: Path = Path("/sys/fs/cgroup")) -> Iterator[Path]:
    """A new cgroup limited to ``cpus`` CPUs; yields its ``cgroup.procs`` file.

    Removed on exit (its processes must have ended). Tries cgroup v2 (``cpu.max``) when
    the unified hierarchy with the cpu controller is mounted at ``root``, else v1.

    Raises:
        QuotaUnavailableError: No writable cpu controller (the reason in the message).
    """
    name = f"emerg-contention-{os.getpid()}"
    period = 100_000
    quota = int(cpus * period)
    if (root / "cgroup.controllers").exists():
        parent = root / _own_path("").strip("/")
        if "cpu" not in (parent / "cgroup.controllers").read_text().split():
            raise QuotaUnavailableError(f"cgroup v2: no cpu controller in {parent}")
        files = {"cpu.max": f"{quota} {period}"}
    else:
        base = next((root / m for m in ("cpu", "cpu,cpuacct") if (root / m).is_dir()), None)
        if base is None:
            raise QuotaUnavailableError(f"no cgroup v1 cpu controller under {root}")
        parent = base / _own_path("cpu").strip("/")
        files = {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(quota)}
    group = parent / name
    try:
        group.mkdir()
        for fname, value in files.items():
            (group / fname).write_text(value)
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise QuotaUnavailableError(f"cannot create a cgroup in {parent}: {exc}") from exc
    try:
        yield group / "cgroup.procs"
    finally:
        for _ in range(50):  # the exited child leaves the group a moment later
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# ------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One child run: wall and CPU seconds, load at its start and end, threads used.

    A run killed at ``--run-timeout-s`` has ``timed_out`` and its wall time is a lower
    bound (shown as ``>N``).
    """

    wall_s: float
    cpu_s: float
    load_start: float | None
    load_end: float | None
    threads: int | None
    job_s: float | None
    timed_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Cell:
    """The runs of one variant under one condition."""

    runs: list[Run] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    def seconds(self, key: str) -> float:
        """The median of ``key`` (``wall_s`` or ``job_s``) over the runs."""
        return statistics.median(getattr(r, key) for r in self.runs)

    @property
    def timed_out(self) -> bool:
        return any(r.timed_out for r in self.runs)

    def loads(self) -> str:
        return "/".join(f"{r.load_start}-{r.load_end}" for r in self.runs)


def child_env(variant: str) -> dict[str, str]:
    """The environment of a variant's run: no thread variables but the variant's own."""
    drop = {*THREAD_ENV_VARS, "OMP_WAIT_POLICY", THREADS_ENV}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if variant == "one-thread":
        env[THREADS_ENV] = "1"
    return env


def child_command(
    variant: str, job: str, dataset: str, out: Path, extra: Sequence[str]
) -> list[str]:
    if job == "worker":  # the worker's drain; its JSON goes to out/results.json
        script = str(REPO_ROOT / "benchmarks" / "stream_throughput.py")
        out.mkdir(parents=True)
        json_out = ["--json", str(out / "results.json")]
        return [sys.executable, script, "--cases", "c", "--reps", "1", *extra, *json_out]
    job = ["--log-json", "--log-level", "INFO", "reproduce", "--dataset", dataset]
    job += ["--out", str(out), *JOB, *extra]
    # threads in one process, except the processes variant (reproduce's default since it)
    job += ["--processes", "auto" if variant == "processes" else "1"]
    if variant == "before":
        return [sys.executable, "-c", BEFORE_CODE, *job]
    return [sys.executable, "-m", "emerg_stream.cli", *job]


def _threads_logged(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"threads_resolved"' in line:
            with contextlib.suppress(ValueError, KeyError):
                return int(json.loads(line)["threads"])
    return None


def run_child(
    cmd: list[str],
    env: dict[str, str],
    workdir: Path,
    timeout_s: float,
    preexec: Callable[[], None] | None,
) -> Run:
    """Run ``cmd`` to its end; its wall and CPU time (from its rusage)."""
    log = workdir / "child.log"
    load_start = load1()
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:  # recorded as a timed-out run, not a crash
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            return Run(
                wall_s=time.perf_counter() - t0,
                cpu_s=usage.ru_utime + usage.ru_stime,
                load_start=load_start,
                load_end=load1(),
                threads=_threads_logged(log),
                job_s=None,
                timed_out=True,
            )
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {log.read_text()[-2000:]}")
    job_s = None
    results = workdir / "out" / "results.json"
    if results.is_file():  # reproduce's wall time, or the worker's drain (case c)
        got = json.loads(results.read_text())
        job_s = got["seconds"]["c"][0] if "seconds" in got else got.get("wall_time_s")
    return Run(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        load_start=load_start,
        load_end=load1(),
        threads=_threads_logged(log),
        job_s=job_s,
    )


@contextlib.contextmanager
def spinners(n: int, max_s: float) -> Iterator[None]:
    """``n`` processes that each keep a core busy, for at most ``max_s`` seconds."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN_CODE, str(max_s)]) for _ in range(n)]
    try:
        time.sleep(0.2 if n else 0.0)
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def run_condition(
    condition: str,
    variants: Sequence[str],
    reps: int,
    make_run: Callable[[str, Callable[[], None] | None], Run],
    spin_max_s: float,
) -> dict[str, Cell]:
    """Every variant under ``condition``, ``reps`` times, alternating the order."""
    cells = {v: Cell() for v in variants}
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for variant in order:
            if condition in ("spin1", "spin3"):
                with spinners(int(condition[-1]), spin_max_s):
                    cells[variant].runs.append(make_run(variant, None))
            elif condition == "pinned":
                core = min(os.sched_getaffinity(0))
                cells[variant].runs.append(
                    make_run(variant, lambda core=core: os.sched_setaffinity(0, {core}))
                )
            elif condition == "quota":
                with quota_cgroup(1.0) as procs_file:

                    def join(procs_file: Path = procs_file) -> None:
                        procs_file.write_text(str(os.getpid()))

                    cells[variant].runs.append(make_run(variant, join))
            else:
                cells[variant].runs.append(make_run(variant, None))
            last = cells[variant].runs[-1]
            print(
                f"# {condition} {variant}: {last.wall_s:.1f} s (job {last.job_s} s, cpu "
                f"{last.cpu_s:.1f} s, {last.threads} threads, load {last.load_start}-"
                f"{last.load_end}{', timed out' if last.timed_out else ''})",
                file=sys.stderr,
                flush=True,
            )
    return cells


# ------------------------------------------------------------------------ report


def summarise(cells: dict[str, dict[str, Cell]], key: str = "wall_s") -> dict[str, Any]:
    """Ratios of ``key`` (``wall_s``, or ``job_s`` for the worker): each condition over the
    same variant alone; after over before."""
    out: dict[str, Any] = {}
    alone = cells.get("alone", {})

    def over(a: Cell, b: Cell) -> float:
        return a.seconds(key) / b.seconds(key)

    for cond, by_variant in cells.items():
        row: dict[str, Any] = {}
        for variant, cell in by_variant.items():
            base = alone.get(variant)
            row[variant] = {
                "wall_s": cell.wall_s,
                key: cell.seconds(key),
                "timed_out": cell.timed_out,
                "vs_alone": over(cell, base) if base and cond != "alone" else None,
                "runs": [r.to_dict() for r in cell.runs],
            }
        if "before" in by_variant and "after" in by_variant:
            row["after_vs_before"] = over(by_variant["after"], by_variant["before"])
        if "processes" in by_variant and "after" in by_variant:
            row["processes_vs_after"] = over(by_variant["processes"], by_variant["after"])
        if cond == "pinned" and "after" in by_variant:
            # pinned vs a one-thread run: the one pinned too (same moment, same core), and
            # the one alone (unpinned; the load of a shared box may have moved in between)
            for name, ref in (("pinned", by_variant), ("alone", alone)):
                if "one-thread" in ref:
                    row[f"after_vs_one_thread_{name}"] = over(
                        by_variant["after"], ref["one-thread"]
                    )
        out[cond] = row
    targets = {}
    for cond, limit in TARGETS.items():
        row = out.get(cond)
        if not row or "after" not in row:
            continue
        if cond == "pinned":
            got = row.get("after_vs_one_thread_pinned", row.get("after_vs_one_thread_alone"))
        else:
            got = row["after"]["vs_alone"]
        if got is not None:
            targets[cond] = {"target": limit, "after": got, "met": got <= limit}
    out["targets"] = targets
    return out


def markdown(
    cells: dict[str, dict[str, Cell]],
    summary: dict[str, Any],
    skipped: dict[str, str],
    key: str = "wall_s",
) -> str:
    variants = list(next(iter(cells.values())).keys()) if cells else []
    headers = ["condition", *[f"{v}: s (x alone) [load start-end]" for v in variants]]
    headers.append("after / before")
    rows = []
    for cond, by_variant in cells.items():
        row = [cond]
        for v in variants:
            c = by_variant[v]
            ratio = summary[cond][v]["vs_alone"]
            threads = {r.threads for r in c.runs if r.threads is not None}
            th = f", {'/'.join(map(str, sorted(threads)))} thr" if threads else ""
            ratio_s = f" ({ratio:.2f}x)" if ratio is not None else ""
            lower = ">" if c.timed_out else ""
            row.append(f"{lower}{c.seconds(key):.1f}{ratio_s}{th} [{c.loads()}]")
        avb = summary[cond].get("after_vs_before")
        row.append(f"{avb:.2f}" if avb is not None else "-")
        rows.append(row)
    text = markdown_table(headers, rows)
    for cond in cells:
        pva = summary[cond].get("processes_vs_after")
        if pva is not None:
            text += f"\n{cond}: processes / after (threads) = **{pva:.2f}**"
    for cond, reason in skipped.items():
        text += f"\n{cond}: skipped ({reason})"
    for cond, t in summary["targets"].items():
        text += (
            f"\ntarget {cond}: after {t['after']:.2f}x, target <= {t['target']}x: "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    return text + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument(
        "--job",
        choices=("reproduce", "worker"),
        default="reproduce",
        help="the small reproduce, or the worker draining the ml-100k replay (stream_throughput)",
    )
    p.add_argument("--dataset", default="ml-100k", help="the reproduce's dataset (preset/YAML)")
    p.add_argument("--checkpoint", type=Path, default=None, help="--job worker's checkpoint")
    p.add_argument("--conditions", nargs="*", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS[:3]), choices=VARIANTS)
    p.add_argument("--spin-max-s", type=float, default=900.0, help="a spinner's longest life")
    p.add_argument("--run-timeout-s", type=float, default=900.0, help="a run's longest wall")
    p.add_argument(
        "--job-arg",
        action="append",
        default=[],
        help="one more argument for reproduce (repeat), e.g. --job-arg=--meta-epochs=1",
    )
    args = p.parse_args(argv)
    device = setup(args)
    head = header("contention.py", argv, device)  # the load average at the start
    info = head["machine"]
    reps = args.reps or 1
    extra = list(args.job_arg)
    key = "job_s" if args.job == "worker" else "wall_s"
    if args.job == "worker":
        if args.checkpoint is not None:
            extra += ["--checkpoint", str(args.checkpoint)]
        if args.quick:
            extra += ["--quick"]
    elif args.quick:
        extra += ["--pretrain-epochs", "1", "--meta-epochs", "1"]

    def make_run(variant: str, preexec: Callable[[], None] | None) -> Run:
        with tempfile.TemporaryDirectory(prefix="emerg-contention-") as tmp:
            cmd = child_command(variant, args.job, args.dataset, Path(tmp) / "out", extra)
            return run_child(cmd, child_env(variant), Path(tmp), args.run_timeout_s, preexec)

    cells: dict[str, dict[str, Cell]] = {}
    skipped: dict[str, str] = {}
    for cond in args.conditions:
        if cond == "quota":
            try:
                with quota_cgroup(1.0):
                    pass
            except (QuotaUnavailableError, OSError) as exc:
                skipped[cond] = str(exc)
                continue
        if cond == "pinned" and not hasattr(os, "sched_setaffinity"):
            skipped[cond] = "no sched_setaffinity on this platform"
            continue
        cells[cond] = run_condition(cond, args.variants, reps, make_run, args.spin_max_s)
    summary = summarise(cells, key)
    info["load_avg_1m_at_end"] = load1()
    result = {
        **head,
        "job": args.job,
        "metric": key,
        "dataset": args.dataset,
        "job_args": extra if args.job == "worker" else [*JOB, *extra],
        "reps": reps,
        "skipped": skipped,
        "results": summary,
    }
    what = (
        "the worker draining the replay (stream_throughput.py (c)); median drain s"
        if args.job == "worker"
        else f"`reproduce --dataset {args.dataset}`; median wall s"
    )
    title = (
        f"Contention: {what} of {reps} run(s) ({info['cpus_usable']} usable CPUs, "
        f"load {info.get('load_avg_1m_at_start')} at start)\n\n"
    )
    emit(result, title + markdown(cells, summary, skipped, key), args.json)
    return result


if __name__ == "__main__":
    main()
