"""Growth of the stream's costs (benchmarks 3 and 5) as items go 1e3 -> 1e4 -> 1e5.

For each size N, a log of N new items is made from the ml-100k replay: item ``s`` is a
copy of replay item ``s mod 1,682`` under its own id, announced in turn, followed by
``--clicks`` interactions (default K, so every item runs one warm-up phase) taken from
its source item's (user features and labels included; event ids made unique), the items'
clicks interleaved in time. Then, on the embedded broker, as in ``stream_throughput.py``
(one rep per size, cases a, b, c in turn): (a) consume + Avro decode, (b) the processor
from memory, (c) the worker through Kafka; and, as in ``state.py``, the resident bytes
per item and the changelog restore of N item states. The curves go to
``docs/benchmarks-growth-stream.png``; the warm-up and cold-start curves (1, 2) are
``growth.py``'s.

    python benchmarks/growth_stream.py                  # 1e3, 1e4, 1e5 items
    python benchmarks/growth_stream.py --quick --no-plot
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import state
from benchmarks import stream_inputs as si
from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    emit,
    fmt,
    header,
    log_slope,
    markdown_table,
    setup,
)
from benchmarks.stream_throughput import consume_decode, process_offline, run_worker
from emerg_stream.serving.handler import TorchWarmupHandler

#: Items between two consecutive announcements' first clicks: how many items' clicks
#: are interleaved at any time.
WINDOW = 200


def scaled_events(source: si.Events, n_items: int, clicks: int) -> si.Events:
    """``n_items`` items copied from ``source``'s, ``clicks`` interactions each."""
    items = [r for kind, _, r, _ in source.records if kind == "item"]
    by_item: dict[str, list[Any]] = {}
    for kind, key, r, _ in source.records:
        if kind == "interaction":
            by_item.setdefault(key, []).append(r)
    items = [r for r in items if by_item.get(r["item_id"])]
    plan: list[tuple[int, int, str, Any]] = []  # (time, order, kind, record)
    for s in range(n_items):
        src = items[s % len(items)]
        item_id = f"{src['item_id']}~{s}"
        plan.append((s, 0, "item", {**src, "item_id": item_id}))
        rows = by_item[src["item_id"]]
        for j in range(clicks):
            r = rows[j % len(rows)]
            t = s + 1 + (j * WINDOW) // clicks
            rec = {**r, "item_id": item_id, "event_id": f"{r['event_id']}~{s}~{j}"}
            plan.append((t, 1 + j, "interaction", rec))
    plan.sort(key=lambda p: (p[0], p[1]))
    records = []
    for t, _, kind, rec in plan:
        if kind == "interaction":
            rec["event_time"] = 1_000_000 + t
        serde: Any = si.ITEM if kind == "item" else si.INTER
        records.append((kind, rec["item_id"], rec, serde.encode(rec)))
    return si.Events(f"{source.source} scaled to {n_items:,} items", source.checkpoint, records)


def stream_costs(handler: TorchWarmupHandler, events: si.Events, partitions: int) -> dict[str, Any]:
    """Events/s of (a), (b), (c) on ``events`` (one run each, as in stream_throughput)."""
    from emerg_stream.stream.broker import EmbeddedBroker

    n = len(events.records)
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        inputs = si.fresh_topics(conf, partitions, "g")
        inbound, _ = si.produce_all(conf, inputs, events)
        decoded = {
            (m.topic, m.partition, m.offset): rec
            for m, (_, _, rec, _) in zip(inbound, events.records, strict=True)
        }
        got, a_s = consume_decode(conf, inputs, n)
        if got != n:
            raise RuntimeError(f"(a) read {got} of {n}")
        t0 = time.perf_counter()
        got = process_offline(handler, inputs, inbound, decoded, 512)
        b_s = time.perf_counter() - t0
        if got != n:
            raise RuntimeError(f"(b) counted {got} of {n}")
        c_s, _ = run_worker(handler, broker.bootstrap, inputs, n, 512)
    rate = {"a": n / a_s, "b": n / b_s, "c": n / c_s}
    ideal = 1.0 / (1.0 / rate["a"] + 1.0 / rate["b"])
    return {
        "events": n,
        "seconds": {"a": a_s, "b": b_s, "c": c_s},
        "events_per_s": rate,
        "ratio": rate["c"] / ideal,
    }


def state_costs(n_items: int, checkpoint: Path) -> dict[str, Any]:
    """``state.py --items n_items`` in a fresh process (resident-set growth is only
    meaningful in a process whose heap has not held and freed the stream runs' data)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.json"
        cmd = [sys.executable, str(Path(__file__).with_name("state.py")), "--items", str(n_items)]
        cmd += ["--reps", "1", "--checkpoint", str(checkpoint), "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return dict(json.loads(out.read_text()))


def plot(sizes: list[int], rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for case, label in (("a", "(a) consume + decode"), ("b", "(b) processor"), ("c", "(c) worker")):
        ax.plot(sizes, [r["stream"]["events_per_s"][case] for r in rows], "o-", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="new items",
        ylabel="events/s",
        title="3. stream throughput",
    )
    ax.legend()
    ax = axes[1]
    ax.plot(sizes, [r["state"]["rss_bytes_per_item"] for r in rows], "o-", label="held")
    ax.plot(
        sizes,
        [r["state"]["rss_bytes_per_item_restored_lazy"] for r in rows],
        "o--",
        label="restored (lazy)",
    )
    ax.axhline(state.TARGET_BYTES, color="grey", lw=1, ls=":", label="target 4 KiB")
    ax.set(
        xscale="log",
        xlabel="items in state",
        ylabel="resident bytes per item",
        title="5. state size",
    )
    ax.legend()
    ax = axes[2]
    ax.plot(sizes, [r["state"]["restore_items_per_s"] for r in rows], "o-", label="restore")
    ax.axhline(state.TARGET_RESTORE, color="grey", lw=1, ls=":", label="target 50,000/s")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="items in the changelog",
        ylabel="items/s",
        title="5. changelog restore",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    si.add_arguments(p)
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="numbers of items")
    p.add_argument("--clicks", type=int, default=0, help="interactions per item (0: K)")
    p.add_argument("--png", type=Path, default=REPO_ROOT / "docs" / "benchmarks-growth-stream.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.threads <= 0:
        args.threads = 1
    setup(args)
    sizes = args.sizes or ([100, 1000] if args.quick else [1000, 10_000, 100_000])
    source = si.load_events(None, args.checkpoint)
    handler = TorchWarmupHandler.from_checkpoint(source.checkpoint, "cpu")
    clicks = args.clicks or handler.k
    rows = []
    for n in sizes:
        events = scaled_events(source, n, clicks)
        stream = stream_costs(handler, events, args.partitions)
        st = state_costs(n, source.checkpoint)
        rows.append({"items": n, "stream": stream, "state": st})
    table = markdown_table(
        [
            "items",
            "events",
            "(a) events/s",
            "(b) events/s",
            "(c) events/s",
            "c / (a then b)",
            "RSS B/item",
            "restore items/s",
        ],
        [
            [
                f"{r['items']:,}",
                f"{r['stream']['events']:,}",
                fmt(r["stream"]["events_per_s"]["a"]),
                fmt(r["stream"]["events_per_s"]["b"]),
                fmt(r["stream"]["events_per_s"]["c"]),
                f"{r['stream']['ratio']:.2f}",
                fmt(r["state"]["rss_bytes_per_item"]),
                fmt(r["state"]["restore_items_per_s"]),
            ]
            for r in rows
        ],
    )
    slopes = {
        case: log_slope(
            [float(r["stream"]["events"]) for r in rows],
            [r["stream"]["seconds"][case] for r in rows],
        )
        for case in "abc"
    }
    table += (
        "\nlog-log slopes of seconds vs events: "
        + ", ".join(f"{c} {fmt(s)}" for c, s in slopes.items())
        + f"; {clicks} clicks per item from {source.source}\n"
    )
    if not args.no_plot and len(sizes) > 1:
        plot(sizes, rows, args.png)
        table += f"plot: {args.png}\n"
    result = {
        **header("growth_stream.py", argv, torch.device("cpu")),
        "clicks_per_item": clicks,
        "sizes": sizes,
        "rows": [
            {
                "items": r["items"],
                "stream": r["stream"],
                "state": {
                    k: r["state"][k]
                    for k in (
                        "rss_bytes_per_item",
                        "rss_bytes_per_item_restored_lazy",
                        "encoded_bytes_per_item",
                        "restore_items_per_s",
                    )
                },
            }
            for r in rows
        ],
        "log_slopes_seconds_vs_events": slopes,
    }
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
