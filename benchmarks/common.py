"""Shared helpers of the benchmarks: machine record, interleaved timing, output, inputs.

Every benchmark script prints a markdown table and then one JSON object on its last
line (``emit``). Timings compared with each other are taken in one run, interleaved
(``interleaved``), several repetitions, and reported as medians and ratios: the machines
these run on are shared, so absolute numbers drift while ratios hold better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from emerg_stream.devices import DEVICES  # noqa: E402
from emerg_stream.meta.rows import ItemSet, Rows  # noqa: E402
from emerg_stream.model import EmerG, ModelConfig  # noqa: E402
from emerg_stream.threads import configure_threads, resolve_threads  # noqa: E402

# ML-1M's field layout (item fields first, the item id at position 0) with vocabulary
# sizes scaled so the shared table has ~10k rows: (size, tokens per row, multi-valued).
ML1M_FIELDS: tuple[tuple[str, int, int, bool], ...] = (
    ("item_id", 2000, 1, False),
    ("year", 63, 1, False),
    ("title_words", 1227, 8, True),
    ("genres", 19, 6, True),
    ("user_id", 3000, 1, False),
    ("gender", 3, 1, False),
    ("age", 8, 1, False),
    ("occupation", 22, 1, False),
    ("zip", 3657, 1, False),
)
N_ITEM_FIELDS = 4
SIDE_FIELDS = (1, 2, 3)
TOKENS = 8  # T: the widest field (title words)
VOCAB = 1 + sum(f[1] for f in ML1M_FIELDS)  # row 0 is padding
K = 20  # support rows per item of the warm-up benchmarks


# ----------------------------------------------------------------------------- CLI


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="compute threads (0 = the rule of emerg_stream/threads.py: the CPUs this "
        "process may use; N = at most N)",
    )
    p.add_argument("--reps", type=int, default=0, help="repetitions (0 = the script's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON object here")
    return p


def resolve_device(name: str) -> torch.device:
    """:func:`emerg_stream.devices.resolve_device`; a refusal ends the benchmark in one line."""
    from emerg_stream.devices import resolve_device as resolve
    from emerg_stream.errors import ConfigError

    try:
        return resolve(name)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads through the thread rule, quieten the library's INFO logs (stdout is
    the report), resolve --device."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    configure_threads(args.threads if args.threads > 0 else None)
    return resolve_device(args.device)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run (for the report)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}", *args])


# ------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (load average included: the box is shared)."""
    budget = resolve_threads()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": budget.threads,
        "cpus_usable_source": budget.source,
        "cpu_affinity": budget.affinity,
        "cpu_quota": budget.quota_cpus,
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
        ),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def header(script: str, argv: Sequence[str] | None, device: torch.device) -> dict[str, Any]:
    """The first keys of every benchmark's JSON: its name, its command line, the machine.

    Call it where the machine should be recorded (its load average is read then).
    """
    return {
        "benchmark": script.removesuffix(".py"),
        "command": command_line(script, argv),
        "machine": machine_info(device),
    }


# -------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """Wall-clock and process-CPU seconds of repeated runs of one case."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        """Median process CPU seconds (all threads; insensitive to being descheduled)."""
        return statistics.median(self.cpu)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: medians and every sample."""
        return {
            "wall_s_median": self.wall_s,
            "cpu_s_median": self.cpu_s,
            "wall_s": [round(x, 6) for x in self.wall],
            "cpu_s": [round(x, 6) for x in self.cpu],
        }


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of one call."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def interleaved(
    cases: dict[str, Callable[[], Any]],
    device: torch.device,
    reps: int,
    warmup: int = 1,
) -> tuple[dict[str, Samples], dict[str, Any]]:
    """Time cases round-robin (a, b, c, a, b, c, ...) so drift hits all of them alike.

    Returns:
        Samples per case, and each case's result of its last repetition.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples = {name: Samples() for name in cases}
    results: dict[str, Any] = {}
    for rep in range(reps):
        names = list(cases) if rep % 2 == 0 else list(reversed(cases))
        for name in names:
            wall, cpu, results[name] = time_once(cases[name], device)
            samples[name].wall.append(wall)
            samples[name].cpu.append(cpu)
    return samples, results


def matmul_flops(
    device: torch.device, shapes: Iterable[tuple[int, int, int]], reps: int = 5
) -> dict[str, float]:
    """Measured FLOP/s of plain ``torch.mm`` (m x k) @ (k x n) for each shape (median)."""
    out: dict[str, float] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        torch.mm(a, b)
        times = [time_once(lambda a=a, b=b: torch.mm(a, b), device)[0] for _ in range(reps)]
        out[f"{m}x{k}@{k}x{n}"] = 2.0 * m * k * n / statistics.median(times)
    return out


# -------------------------------------------------------------------------- output


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table: ``-`` for None, thousands separators for big values."""
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def emit(result: dict[str, Any], markdown: str, json_path: Path | None = None) -> None:
    """Print the markdown, then the JSON object on one line (the last line of stdout)."""
    print(markdown)
    text = json.dumps(result, default=str)
    print(text, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def log_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): 1.0 = linear growth."""
    import math

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


# -------------------------------------------------------------------------- inputs


def ml1m_config(attention: str = "joint") -> ModelConfig:
    """EmerG with ML-1M's shape: F=9 (4 item fields), d=16, L=2, H=3, vocab ~10k.

    ``attention``: the model's default reading (``joint``) unless told; rounds 1-5 of
    docs/BENCHMARKS.md measured the per-field reading (``field``), the default then.
    """
    return ModelConfig(
        kind="emerg",
        n_fields=len(ML1M_FIELDS),
        n_item_fields=N_ITEM_FIELDS,
        side_fields=SIDE_FIELDS,
        vocab_size=VOCAB,
        dim=16,
        layers=2,
        heads=3,
        attention=attention,  # type: ignore[arg-type]
    )


def build_emerg(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attention: str = "joint",
) -> EmerG:
    """A randomly initialised EmerG of ML-1M's shape (random weights: speed only)."""
    torch.manual_seed(seed)
    model = EmerG(ml1m_config(attention))
    # the default init leaves the table near zero; spread it so activations are typical
    with torch.no_grad():
        model.embedding.table.weight.normal_(0.0, 0.1)
        model.embedding.table.weight[0].zero_()
    return model.to(device=device, dtype=dtype).eval()


def _field_tokens(
    n: int, field_idx: int, gen: torch.Generator, rows_of: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, T]`` and weights of one field (multi-valued: 1..T tokens, mean)."""
    offset = 1 + sum(f[1] for f in ML1M_FIELDS[:field_idx])
    _, size, max_len, multi = ML1M_FIELDS[field_idx]
    tok = torch.zeros(n, TOKENS, dtype=torch.long)
    w = torch.zeros(n, TOKENS)
    if rows_of is not None:  # a function of the item: seeded by the item index
        base = (rows_of * 7919 + field_idx * 104729)[:, None] + torch.arange(max_len)[None, :]
        ids = base % size
        count = 1 + (rows_of * 31 + field_idx) % max_len if multi else torch.ones_like(rows_of)
    else:
        ids = torch.randint(0, size, (n, max_len), generator=gen)
        count = (
            torch.randint(1, max_len + 1, (n,), generator=gen) if multi else torch.ones(n).long()
        )
    keep = torch.arange(max_len)[None, :] < count[:, None]
    tok[:, :max_len] = torch.where(keep, ids + offset, torch.zeros_like(ids))
    w[:, :max_len] = keep.float() / count[:, None].float()
    return tok, w


def synthetic_items(
    n_items: int,
    rows_per_item: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[ItemSet, Rows]:
    """New items of ML-1M's layout and ``rows_per_item`` labelled support rows each.

    Item fields are a function of the item; user fields are random per row. Rows are
    grouped by item (item 0's rows first), as a warm-up phase delivers them.
    """
    gen = torch.Generator().manual_seed(seed)
    n = n_items * rows_per_item
    item = torch.arange(n_items).repeat_interleave(rows_per_item)
    toks, ws = [], []
    for j in range(len(ML1M_FIELDS)):
        t, w = _field_tokens(n, j, gen, item if j < N_ITEM_FIELDS else None)
        toks.append(t)
        ws.append(w)
    tokens = torch.stack(toks, dim=1)
    weights = torch.stack(ws, dim=1).to(dtype)
    labels = (torch.rand(n, generator=gen) < 0.55).to(dtype)
    first = torch.arange(n_items) * rows_per_item
    items = ItemSet(
        ids=[f"new-{i}" for i in range(n_items)],
        tokens=tokens[first].clone(),
        weights=weights[first].clone(),
    )
    return items, Rows(tokens, weights, labels, item)


def sample_items(items: ItemSet, rows: Rows, idx: torch.Tensor) -> tuple[ItemSet, Rows]:
    """The items at ``idx`` (re-indexed 0..len-1) and their rows."""
    remap = torch.full((len(items),), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    keep = (remap[rows.item] >= 0).nonzero().squeeze(1)
    sub = rows.select(keep)
    return (
        ItemSet([items.ids[int(i)] for i in idx], items.tokens[idx], items.weights[idx]),
        Rows(sub.tokens, sub.weights, sub.labels, remap[sub.item]),
    )


# ------------------------------------------------------------------ φ comparisons


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest entry-wise difference over all φ tensors."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def items_over(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> int:
    """Items whose φ differ by more than ``tol`` in some entry."""
    worst = torch.stack(
        [(a[k].double() - b[k].double()).abs().flatten(1).max(dim=1).values for k in a]
    )
    return int((worst.max(dim=0).values > tol).sum())


def rate(n: float, seconds: float) -> float:
    """``n`` per second (infinite for a zero time)."""
    return n / seconds if seconds > 0 else float("inf")
