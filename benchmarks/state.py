"""Worker state: resident bytes per item and restore speed from the changelog.

Builds ``--items`` item states as the worker holds them at their fullest: ``K-1`` rows in
the support buffer (the most it holds between updates; K from the checkpoint), a common
phase item that has seen ``5K-1`` clicks (all their event ids in the de-duplication
window), φ of the checkpoint's shape, side features and user features of real replay
records. Measured: the changelog encoding's size per item and the process RSS delta of
holding the store (``/proc/self/statm``); the worst case where the de-duplication
window is full (``dedupe_window`` ids per item, default 1000) on a sample; then every
state is produced to a changelog topic (2 partitions, with a partition mark each) and
restored with the worker's ``restore_partitions`` (reps, median) -> items/s.
Targets: <= 4 KiB per item, restore >= 50,000 items/s.

    python benchmarks/state.py            # 100,000 items
    python benchmarks/state.py --quick    # 10,000 items
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from confluent_kafka import Consumer, Producer

from benchmarks import stream_inputs as si
from benchmarks.common import (
    base_parser,
    command_line,
    emit,
    fmt,
    machine_info,
    markdown_table,
    setup,
)
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state import COMMON, ItemTask, RecentIds, StateStore
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.changelog import restore_partitions
from emerg_stream.stream.checkpointing import MARK_KEY, PartitionMark
from emerg_stream.stream.metrics import OutcomeCounts
from emerg_stream.stream.replay import reader_conf

TARGET_BYTES = 4096
TARGET_RESTORE = 50_000.0
PARTITIONS = 2


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_tasks(
    n: int, events: si.Events, codec: ItemStateCodec, k: int, f: int, d: int, recent: int
) -> dict[str, ItemTask]:
    """``n`` full item states (see the module docstring), ``recent`` event ids each."""
    items = [r for kind, _, r, _ in events.records if kind == "item"]
    clicks = [r for kind, _, r, _ in events.records if kind == "interaction"]
    rng = np.random.default_rng(0)
    out: dict[str, ItemTask] = {}
    for i in range(n):
        item = items[i % len(items)]
        item_id = f"item-{i:07d}"
        support = []
        for j in range(k - 1):
            row = dict(clicks[(i * k + j) % len(clicks)])
            row["event_id"] = f"ml-100k:{i * 5 * k + 4 * k + j}"
            support.append(codec.encode_row(row))
        task = ItemTask(
            item_id=item_id,
            categorical=dict(item["categorical"]),
            multi={kk: list(v) for kk, v in item["multi"].items()},
            numeric=dict(item["numeric"]),
            phase=COMMON,
            version=5,
            support_size=5 * k - 1,
            next_threshold=5 * k,
            support=support,
            recent=RecentIds(
                codec.dedupe_window, (f"ml-100k:{i * 5 * k + j}" for j in range(recent))
            ),
            last_offsets={
                ("emerg.items", i % PARTITIONS): i,
                ("emerg.interactions", i % PARTITIONS): 5 * k * i,
            },
            updated_time=1_700_000_000_000 + i,
        )
        task.set_params(
            rng.standard_normal(f * f).astype(np.float32), rng.standard_normal(d).astype(np.float32)
        )
        out[item_id] = task
    return out


def held_bytes(build: Any) -> tuple[int, Any]:
    """RSS growth while holding what ``build()`` returns (gc'd before and after)."""
    gc.collect()
    before = rss_bytes()
    obj = build()
    gc.collect()
    return rss_bytes() - before, obj


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = base_parser(__doc__.splitlines()[0])
    si.add_arguments(ap)
    ap.add_argument("--items", type=int, default=0, help="item states (default 1e5, quick 1e4)")
    ap.add_argument("--dedupe-window", type=int, default=1000, help="WorkerSettings.dedupe_window")
    args = ap.parse_args(argv)
    setup(args)
    n = args.items or (10_000 if args.quick else 100_000)
    reps = args.reps or (2 if args.quick else 3)
    events = si.load_events(20_000, args.checkpoint)
    handler = TorchWarmupHandler.from_checkpoint(events.checkpoint, "cpu")
    k, f, d = handler.k, handler.n_fields, handler.dim
    codec = ItemStateCodec(dedupe_window=args.dedupe_window)

    # resident bytes: the store as the worker holds it
    def build_store() -> StateStore:
        store = StateStore()
        tasks = build_tasks(n, events, codec, k, f, d, recent=min(5 * k - 1, args.dedupe_window))
        for p in range(PARTITIONS):
            store.add_partition(
                p, {i: t for j, (i, t) in enumerate(tasks.items()) if j % PARTITIONS == p}
            )
        return store

    rss, store = held_bytes(build_store)
    tasks = [t for p in store.partitions for t in store.partition(p).items.values()]
    t0 = time.perf_counter()
    values = [codec.encode(t) for t in tasks]
    encode_s = time.perf_counter() - t0
    enc = statistics.mean(len(v) for v in values)

    # worst case: a full de-duplication window
    sample = min(n, 2000)
    rss_full, full = held_bytes(
        lambda: build_tasks(sample, events, codec, k, f, d, recent=args.dedupe_window)
    )
    enc_full = statistics.mean(len(codec.encode(t)) for t in full.values())
    del full

    from emerg_stream.stream.broker import EmbeddedBroker

    restore_s: list[float] = []
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        topics = si.fresh_topics(conf, PARTITIONS, "st")
        p = Producer({**conf, "linger.ms": 20, "enable.idempotence": True})
        for i, (task, value) in enumerate(zip(tasks, values, strict=True)):
            part = int(task.item_id[5:]) % PARTITIONS
            p.produce(topics.changelog, value, task.item_id.encode(), part)
            if i % 5000 == 4999 and p.flush(120):  # as checkpoints do: flushed in steps
                raise RuntimeError("changelog not delivered")
        for part in range(PARTITIONS):
            mark = PartitionMark(
                part,
                handler.model_version,
                {"items": n, "interactions": n},
                [],
                0,
                OutcomeCounts(),
                0,
            )
            p.produce(topics.changelog, mark.encode(), MARK_KEY, part)
        if p.flush(300):
            raise RuntimeError("changelog not delivered")
        del p, values
        consumer = Consumer(reader_conf(conf))
        try:
            for _ in range(reps):
                t0 = time.perf_counter()
                restored = restore_partitions(
                    consumer, topics.changelog, list(range(PARTITIONS)), codec, timeout_s=600
                )
                restore_s.append(time.perf_counter() - t0)
                got = sum(len(r.items) for r in restored.values())
                if got != n:
                    raise RuntimeError(f"restored {got} items of {n}")
                del restored
        finally:
            consumer.close()

    per_item_rss = rss / n
    restore_rate = n / statistics.median(restore_s)
    rows = [
        [
            "changelog value (encoded ItemState)",
            fmt(enc),
            fmt(TARGET_BYTES),
            "met" if enc <= TARGET_BYTES else "missed",
        ],
        [
            "process RSS delta per item (store held)",
            fmt(per_item_rss),
            fmt(TARGET_BYTES),
            "met" if per_item_rss <= TARGET_BYTES else "missed",
        ],
        [
            f"worst case: full dedupe window ({args.dedupe_window} ids), encoded",
            fmt(enc_full),
            "-",
            "-",
        ],
        [
            f"worst case: full dedupe window ({args.dedupe_window} ids), RSS",
            fmt(rss_full / sample),
            "-",
            "-",
        ],
    ]
    md = markdown_table(["bytes per item", "value", "target", ""], rows)
    md += "\n" + markdown_table(
        ["restore from the changelog", "items/s (median)", "target", ""],
        [
            [
                f"{n:,} items, {PARTITIONS} partitions, {reps} reps",
                fmt(restore_rate),
                fmt(TARGET_RESTORE),
                "met" if restore_rate >= TARGET_RESTORE else "missed",
            ]
        ],
    )
    md += (
        f"\nK={k}, F={f}, D={d}: {k - 1} support rows, "
        f"{min(5 * k - 1, args.dedupe_window)} event ids per item; "
        f"encode {n / encode_s:,.0f} items/s; source {events.source}\n"
    )
    result = {
        "benchmark": "state",
        "command": command_line("state.py", argv),
        "machine": machine_info(torch.device("cpu")),
        "items": n,
        "k": k,
        "n_fields": f,
        "dim": d,
        "encoded_bytes_per_item": enc,
        "rss_bytes_per_item": per_item_rss,
        "full_dedupe_encoded_bytes_per_item": enc_full,
        "full_dedupe_rss_bytes_per_item": rss_full / sample,
        "encode_items_per_s": n / encode_s,
        "restore_s": restore_s,
        "restore_items_per_s": restore_rate,
        "targets": {"bytes_per_item": TARGET_BYTES, "restore_items_per_s": TARGET_RESTORE},
        "met": {
            "bytes_encoded": enc <= TARGET_BYTES,
            "bytes_rss": per_item_rss <= TARGET_BYTES,
            "restore": restore_rate >= TARGET_RESTORE,
        },
    }
    emit(result, md, args.json)
    return result


if __name__ == "__main__":
    main()
