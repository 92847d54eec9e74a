"""End-to-end latency: an interaction produced -> the params version it triggered readable.

One run: (1) the sustainable rate: a worker drains a backlog of the first events (as in
``stream_throughput.py`` (c)); (2) on fresh topics, with a worker already in its group,
the events are produced paced at **half** that rate while a reader (assigned,
``fetch.wait.max.ms=10``) follows the item-params topic. Each published version names
the input records it applied last (``source_offsets``); the latest-produced of them is
the record that triggered it (an item's announcement for version 1, the K-th click of a
phase for the others). Latency = when the reader got the version - when that record was
produced (``produce()`` called); the worker-side part ends at the version's
``produced_time``. Target: p99 <= 500 ms on CPU.

    python benchmarks/latency.py              # 30 s of paced traffic
    python benchmarks/latency.py --quick      # 8 s
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

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
from benchmarks.stream_throughput import run_worker
from emerg_stream.config import TopicSettings
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import ItemParams
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.replay import reader_conf
from emerg_stream.stream.worker import Worker

TARGET_P99_MS = 500.0
#: Records produced this long after the first are "steady state" (the worker's first
#: batches pay one-off costs: first fetches, allocator and model warm-up).
STEADY_AFTER_S = 2.0


def follow_params(
    conf: dict[str, str], topics: TopicSettings, stop: threading.Event, out: list[tuple[float, Any]]
) -> None:
    """Append (receive time, ItemParams) for every params record until ``stop``."""
    serde: AvroSerde[ItemParams] = AvroSerde(ItemParams)
    c = Consumer(reader_conf({**conf, "fetch.wait.max.ms": "10"}))
    c.assign(
        [
            TopicPartition(topics.item_params, p, OFFSET_BEGINNING)
            for p in range(topics.partitions or 1)
        ]
    )
    try:
        while not stop.is_set():
            for m in c.consume(500, timeout=0.05):
                if m.error() is None:
                    out.append((time.time(), serde.decode(m.value())))
    finally:
        c.close()


def paced_produce(
    conf: dict[str, str], topics: TopicSettings, events: si.Events, rate: float, seconds: float
) -> tuple[dict[tuple[str, int, int], float], int]:
    """Produce events in send order at ``rate``/s for ``seconds``; (offset -> produce time)."""
    p = Producer({**conf, "enable.idempotence": True, "linger.ms": 5})
    sent_at: dict[tuple[str, int, int], float] = {}

    def cb(t: float) -> Any:
        def done(err: Any, msg: Any) -> None:
            if err is None:
                sent_at[(msg.topic(), msg.partition(), msg.offset())] = t

        return done

    n = min(len(events.records), int(rate * seconds))
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        while (now := time.perf_counter()) < due:
            p.poll(min(0.005, due - now))
        kind, key, _, value = events.records[i]
        topic = topics.items if kind == "item" else topics.interactions
        p.produce(topic, value, key.encode(), on_delivery=cb(time.time()))
        p.poll(0)
    p.flush(60)
    return sent_at, n


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = base_parser(__doc__.splitlines()[0])
    si.add_arguments(ap)
    ap.add_argument(
        "--seconds", type=float, default=0.0, help="paced traffic (default 30, quick 8)"
    )
    ap.add_argument(
        "--rate", type=float, default=0.0, help="events/s (default: half the sustainable)"
    )
    ap.add_argument(
        "--fetch-wait-ms", type=int, default=0, help="worker fetch.wait.max.ms (0: librdkafka's)"
    )
    ap.add_argument("--batch-timeout-ms", type=int, default=200, help="worker batch_timeout_ms")
    args = ap.parse_args(argv)
    if args.threads <= 0:
        args.threads = 1
    setup(args)
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    events = si.load_events(args.limit or None, args.checkpoint)
    handler = TorchWarmupHandler.from_checkpoint(events.checkpoint, "cpu")

    from emerg_stream.stream.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        # (1) sustainable rate on a backlog
        backlog = si.Events(
            events.source, events.checkpoint, events.records[: 3000 if args.quick else 10_000]
        )
        inputs = si.fresh_topics(conf, args.partitions, "lb")
        si.produce_all(conf, inputs, backlog)
        took, _ = run_worker(handler, broker.bootstrap, inputs, len(backlog.records), 512)
        sustainable = len(backlog.records) / took
        rate = args.rate or sustainable / 2

        # (2) paced traffic through a worker already in its group
        topics = si.fresh_topics(conf, args.partitions, "lat")
        extra = {"fetch.wait.max.ms": str(args.fetch_wait_ms)} if args.fetch_wait_ms else {}
        settings = si.worker_settings(
            broker.bootstrap,
            topics,
            f"lat-{uuid.uuid4().hex[:8]}",
            kafka_extra=extra,
            batch_timeout_ms=args.batch_timeout_ms,
        )
        worker = Worker(settings, handler)
        handled: list[tuple[int, float, float]] = []  # (records, handle s, checkpoint s)
        handle, checkpoint = worker._handle, worker._checkpoint
        cp_s: list[float] = []

        def timed_checkpoint(**kw: Any) -> int:
            t = time.perf_counter()
            out = checkpoint(**kw)
            cp_s.append(time.perf_counter() - t)
            return out

        def timed_handle(batch: list[Any]) -> None:
            t = time.perf_counter()
            handle(batch)
            handled.append((len(batch), time.perf_counter() - t, cp_s[-1] if cp_s else 0.0))

        worker._checkpoint = timed_checkpoint  # type: ignore[method-assign]
        worker._handle = timed_handle  # type: ignore[method-assign]
        wthread = threading.Thread(target=worker.run)
        wthread.start()
        got: list[tuple[float, Any]] = []
        stop = threading.Event()
        reader = threading.Thread(target=follow_params, args=(conf, topics, stop, got))
        reader.start()
        deadline = time.monotonic() + 60
        while worker.rebalances == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        sent_at, n_sent = paced_produce(conf, topics, events, rate, seconds)
        # drain: until the worker counted every record and the reader is quiet
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if worker.counts.total("items") + worker.counts.total("interactions") >= n_sent:
                break
            time.sleep(0.1)
        last = -1
        while len(got) != last:
            last = len(got)
            time.sleep(1.0)
        stop.set()
        worker.stop()
        reader.join(30)
        wthread.join(60)

    total, worker_side, warm, steady = [], [], [], []
    by_second: dict[int, list[float]] = {}
    t_first = min(sent_at.values()) if sent_at else 0.0
    for recv, rec in got:
        srcs = [(o["topic"], o["partition"], o["offset"]) for o in rec["source_offsets"]]
        times = [sent_at[s] for s in srcs if s in sent_at]
        if not times:
            continue
        t_in = max(times)
        total.append((recv - t_in) * 1000)
        by_second.setdefault(int(t_in - t_first), []).append(total[-1])
        worker_side.append(rec["produced_time"] - t_in * 1000)
        if rec["version"] >= 2:
            warm.append((recv - t_in) * 1000)
        if t_in - t_first >= STEADY_AFTER_S:
            steady.append((recv - t_in) * 1000)

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    series = {
        "all versions": total,
        "warm-up versions (>= 2)": warm,
        f"steady state (triggered >= {STEADY_AFTER_S:.0f} s in)": steady,
        "worker part (trigger produced -> params produced_time)": worker_side,
    }
    rows = [
        [name, len(xs), fmt(pct(xs, 50)), fmt(pct(xs, 99)), fmt(max(xs) if xs else None)]
        for name, xs in series.items()
    ]
    p99 = pct(total, 99)
    md = markdown_table(["latency, ms", "versions", "p50", "p99", "max"], rows)
    md += (
        f"\nrate {rate:,.0f} events/s = half the sustainable {sustainable:,.0f} events/s "
        f"(worker draining a backlog of {len(backlog.records)} events); {n_sent} events over "
        f"{seconds:.0f} s from {events.source}, {args.partitions} partitions, worker batch 512, "
        f"batch_timeout_ms {args.batch_timeout_ms}, fetch.wait.max.ms "
        f"{args.fetch_wait_ms or 'default'}; p99 target <= {TARGET_P99_MS:.0f} ms: "
        f"{'met' if p99 is not None and p99 <= TARGET_P99_MS else 'missed'}\n"
    )
    result = {
        "benchmark": "latency",
        "command": command_line("latency.py", argv),
        "machine": machine_info(torch.device("cpu")),
        "source": events.source,
        "sustainable_events_per_s": sustainable,
        "rate_events_per_s": rate,
        "events_sent": n_sent,
        "versions": len(total),
        "latency_ms": {"p50": pct(total, 50), "p99": p99, "max": max(total) if total else None},
        "warmup_latency_ms": {"p50": pct(warm, 50), "p99": pct(warm, 99)},
        "steady_latency_ms": {"p50": pct(steady, 50), "p99": pct(steady, 99)},
        "fetch_wait_max_ms": args.fetch_wait_ms or None,
        "batches": {
            "n": len(handled),
            "records_median": statistics.median([h[0] for h in handled]) if handled else None,
            "handle_ms_median": statistics.median([h[1] * 1000 for h in handled])
            if handled
            else None,
            "handle_ms_p99": pct([h[1] * 1000 for h in handled], 99),
            "checkpoint_ms_median": statistics.median([h[2] * 1000 for h in handled])
            if handled
            else None,
        },
        "p99_ms_by_second": {t: pct(v, 99) for t, v in sorted(by_second.items())},
        "batch_timeout_ms": args.batch_timeout_ms,
        "worker_part_ms": {"p50": pct(worker_side, 50), "p99": pct(worker_side, 99)},
        "median_ms": statistics.median(total) if total else None,
        "target_p99_ms": TARGET_P99_MS,
        "met": p99 is not None and p99 <= TARGET_P99_MS,
    }
    emit(result, md, args.json)
    return result


if __name__ == "__main__":
    main()
