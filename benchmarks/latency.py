"""End-to-end latency: an interaction produced -> the params version it triggered readable.

One run: (1) the sustainable rate: a worker drains a backlog of the events (the whole
replay by default, as in ``stream_throughput.py`` (c)); (2) on fresh topics, with a
worker already in its group, the events are produced paced at **half** that rate while a
reader (assigned, ``fetch.wait.max.ms=10``) follows the item-params topic. The producer
and the reader run in processes of their own (as they would in production; sharing the
worker's process they took its GIL), the worker in this one, instrumented per batch.
Each published version names the input records it applied last (``source_offsets``); the
latest-produced of them is the record that triggered it (an item's announcement for
version 1, the K-th click of a phase for the others). Latency = when the reader got the
version - when that record was produced (``produce()`` called); the worker-side part
ends at the version's ``produced_time``. Target: p99 <= 500 ms on CPU.

Step (2) runs once per batching mode, side by side in one process (``--modes``, order
alternating over ``--reps``): the worker's natural batching, and the "fill" batching it
replaced (wait for ``batch_max_records`` or ``batch_timeout_ms``).

    python benchmarks/latency.py              # 30 s of paced traffic per mode
    python benchmarks/latency.py --quick      # 8 s
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from benchmarks import stream_inputs as si
from benchmarks.common import (
    base_parser,
    emit,
    fmt,
    header,
    markdown_table,
    setup,
)
from benchmarks.stream_throughput import run_worker
from emerg_stream.config import TopicSettings
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import ItemParams
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.reader import reader_conf
from emerg_stream.stream.worker import Worker

TARGET_P99_MS = 500.0
#: Records produced this long after the first are "steady state" (the worker's first
#: batches pay one-off costs: first fetches, allocator and model warm-up).
STEADY_AFTER_S = 2.0


def follow_params(
    conf: dict[str, str],
    topics: TopicSettings,
    ready: Any,
    stop: Any,
    seen: Any,
    out: Connection,
) -> None:
    """Reader process: (receive time, source offsets, produced_time) of every params record.

    Sets ``ready`` once assigned, counts records in ``seen``, and sends the list through
    ``out`` when ``stop`` is set.
    """
    serde: AvroSerde[ItemParams] = AvroSerde(ItemParams)
    c = Consumer(reader_conf({**conf, "fetch.wait.max.ms": "10"}))
    c.assign(
        [
            TopicPartition(topics.item_params, p, OFFSET_BEGINNING)
            for p in range(topics.partitions or 1)
        ]
    )
    got: list[tuple[float, list[tuple[str, int, int]], int, int]] = []
    try:
        c.consume(1, timeout=0.5)  # nothing published yet; the fetch session is set up
        ready.set()
        while not stop.is_set():
            for m in c.consume(500, timeout=0.05):
                value = m.value() if m.error() is None else None
                if value is not None:
                    rec = serde.decode(value)
                    offs = rec["source_offsets"]
                    srcs = [(o["topic"], o["partition"], o["offset"]) for o in offs]
                    got.append((time.time(), srcs, rec["produced_time"], rec["version"]))
                    seen.value = len(got)
    finally:
        c.close()
    out.send(got)


def paced_produce(
    conf: dict[str, str],
    topics: TopicSettings,
    records: list[tuple[str, str, bytes]],
    rate: float,
    seconds: float,
    out: Connection,
) -> None:
    """Producer process: produce ``(kind, key, value)`` in order at ``rate``/s for ``seconds``.

    Sends (offset -> produce() time, records produced, produce() -> delivery report s
    each) through ``out``.
    """
    p = Producer({**conf, "enable.idempotence": True, "linger.ms": 5})
    sent_at: dict[tuple[str, int, int], float] = {}
    acked: list[float] = []  # produce() -> delivery report, s

    def cb(t: float) -> Any:
        def done(err: Any, msg: Any) -> None:
            if err is None:
                sent_at[(msg.topic(), msg.partition(), msg.offset())] = t
                acked.append(time.time() - t)

        return done

    # Ready the producer before the clock: metadata of both topics and (idempotence) its
    # producer id, which took ~500 ms on Tansu and would be charged to the first records.
    for topic in (topics.items, topics.interactions):
        p.list_topics(topic, timeout=10)
    p.poll(1.0)
    n = min(len(records), int(rate * seconds))
    t0 = time.perf_counter()
    i = 0
    while i < n:
        # Every record due by now, each stamped when produced; then wait >= 1 ms (a
        # shorter poll timeout rounds to 0 ms and spun a whole core at these rates).
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        while i < due:
            kind, key, value = records[i]
            topic = topics.items if kind == "item" else topics.interactions
            p.produce(topic, value, key.encode(), on_delivery=cb(time.time()))
            i += 1
        p.poll(max(0.001, t0 + i / rate - time.perf_counter()) if i < n else 0)
    p.flush(60)
    out.send((sent_at, n, acked))


#: How the worker forms batches: ``natural`` is the worker's own (take what is
#: fetched; see ``Worker._next_batch``); ``fill`` is how it batched before (one
#: ``consume(batch_max_records, timeout=batch_timeout_ms)``: wait for a full batch or
#: the timeout), kept here as the "before" of the side-by-side comparison.
MODES = ("natural", "fill")


def fill_batches(worker: Worker) -> None:
    """Make ``worker`` batch as before natural batching: wait for a batch to fill."""
    most, wait_s = worker.settings.batch_max_records, worker.settings.batch_timeout_ms / 1000

    def next_batch(consumer: Consumer) -> list[Any]:
        msgs = list(consumer.consume(most, timeout=wait_s))
        if not msgs:
            worker._checkpoint()  # idle: drain the checkpoint pipeline, as the worker does
        return msgs

    worker._next_batch = next_batch  # type: ignore[method-assign]


def paced_run(
    broker_bootstrap: str,
    handler: TorchWarmupHandler,
    events: si.Events,
    rate: float,
    seconds: float,
    mode: str,
    args: Any,
) -> dict[str, Any]:
    """Paced traffic through a worker already in its group; latencies and batch stats."""
    conf = {"bootstrap.servers": broker_bootstrap}
    topics = si.fresh_topics(conf, args.partitions, "lat")
    extra = {"fetch.wait.max.ms": str(args.fetch_wait_ms)} if args.fetch_wait_ms else {}
    settings = si.worker_settings(
        broker_bootstrap,
        topics,
        f"lat-{uuid.uuid4().hex[:8]}",
        kafka_extra=extra,
        batch_timeout_ms=args.batch_timeout_ms,
        processing_guarantee=args.guarantee,
    )
    worker = Worker(settings, handler)
    if mode == "fill":
        fill_batches(worker)
    # per batch: records, then seconds in handle / process / flush wait / settle
    handled: list[tuple[int, float, float, float, float]] = []
    parts: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    handle = worker._handle

    def timed_handle(batch: list[Any]) -> None:
        parts.clear()
        t = time.perf_counter()
        handle(batch)
        took = time.perf_counter() - t
        settle, proc = parts.get("settle", 0.0), parts.get("process", 0.0)
        handled.append((len(batch), took, proc, parts.get("flush", 0.0), settle))

    pipeline = worker.pipeline  # the at-least-once one; exactly_once replaces it at start
    pipeline.settle = timed("settle", pipeline.settle)  # type: ignore[method-assign]
    worker.output.flush = timed("flush", worker.output.flush)  # type: ignore[method-assign]
    worker.processor.process = timed("process", worker.processor.process)  # type: ignore[method-assign]
    worker._handle = timed_handle  # type: ignore[method-assign]
    wthread = threading.Thread(target=worker.run)
    wthread.start()
    # The producer and the reader run in processes of their own, as they would in
    # production: in this process their Python work would take the worker's GIL.
    ctx = mp.get_context("spawn")
    ready, stop, seen = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
    read_end, read_out = ctx.Pipe(duplex=False)
    reader = ctx.Process(
        target=follow_params, args=(conf, topics, ready, stop, seen, read_out), daemon=True
    )
    reader.start()
    deadline = time.monotonic() + 60
    while (worker.rebalances == 0 or not ready.is_set()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    load = os.getloadavg()[0]
    prod_end, prod_out = ctx.Pipe(duplex=False)
    records = [(kind, key, value) for kind, key, _, value in events.records]
    producer = ctx.Process(
        target=paced_produce, args=(conf, topics, records, rate, seconds, prod_out), daemon=True
    )
    producer.start()
    sent_at, n_sent, acked = prod_end.recv()
    producer.join(30)
    # drain: until the worker counted every record and the reader is quiet
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if worker.counts.total("items") + worker.counts.total("interactions") >= n_sent:
            break
        time.sleep(0.1)
    last = -1
    while seen.value != last:
        last = seen.value
        time.sleep(1.0)
    stop.set()
    got = read_end.recv()
    reader.join(30)
    worker.stop()
    wthread.join(60)

    total, worker_side, warm, steady = [], [], [], []
    by_second: dict[int, list[float]] = {}
    t_first = min(sent_at.values()) if sent_at else 0.0
    for recv, srcs, produced_time, version in got:
        times = [sent_at[s] for s in srcs if s in sent_at]
        if not times:
            continue
        t_in = max(times)
        total.append((recv - t_in) * 1000)
        by_second.setdefault(int(t_in - t_first), []).append(total[-1])
        worker_side.append(produced_time - t_in * 1000)
        if version >= 2:
            warm.append((recv - t_in) * 1000)
        if t_in - t_first >= STEADY_AFTER_S:
            steady.append((recv - t_in) * 1000)
    sizes = [h[0] for h in handled]
    return {
        "mode": mode,
        "load_1m": load,
        "events_sent": n_sent,
        "series": {
            "all versions": total,
            "warm-up versions (>= 2)": warm,
            f"steady state (triggered >= {STEADY_AFTER_S:.0f} s in)": steady,
            "worker part (trigger produced -> params produced_time)": worker_side,
        },
        "batches": {
            "n": len(handled),
            "records_median": statistics.median(sizes) if sizes else None,
            "records_p99": pct([float(x) for x in sizes], 99),
            **{
                f"{name}_ms_{q}": pct([h[i] * 1000 for h in handled], 50 if q == "median" else 99)
                for i, name in enumerate(["handle", "process", "flush", "settle"], start=1)
                for q in ("median", "p99")
            },
        },
        "p99_ms_by_second": {t: pct(v, 99) for t, v in sorted(by_second.items())},
        "producer_ack_ms": {
            "p50": pct([a * 1000 for a in acked], 50),
            "p99": pct([a * 1000 for a in acked], 99),
        },
    }


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


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
        "--fetch-wait-ms", type=int, default=0, help="worker fetch.wait.max.ms (0: the worker's)"
    )
    ap.add_argument("--batch-timeout-ms", type=int, default=200, help="worker batch_timeout_ms")
    ap.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="events of the sustainable-rate run (0: all; the replay's early part has "
        "fewer warm-up updates per event and overstates it)",
    )
    ap.add_argument(
        "--modes",
        default="natural,fill",
        help="batching modes, run in this order then reversed, --reps times (natural: the "
        "worker's; fill: wait for a full batch, as before)",
    )
    args = ap.parse_args(argv)
    if args.threads <= 0:
        args.threads = 1
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    reps = args.reps or 1
    setup(args)
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    events = si.load_events(args.limit or None, args.checkpoint)
    handler = TorchWarmupHandler.from_checkpoint(events.checkpoint, "cpu")

    runs: list[dict[str, Any]] = []
    with si.start_broker(args.broker) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        # (1) sustainable rate on a backlog
        size = args.backlog or (3000 if args.quick else len(events.records))
        backlog = si.Events(events.source, events.checkpoint, events.records[:size])
        inputs = si.fresh_topics(conf, args.partitions, "lb")
        si.produce_all(conf, inputs, backlog)
        took, _ = run_worker(
            handler, broker.bootstrap, inputs, len(backlog.records), 512, args.guarantee
        )
        sustainable = len(backlog.records) / took
        rate = args.rate or sustainable / 2
        # (2) paced traffic, each mode on fresh topics, order alternating between reps
        for r in range(reps):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                runs.append(paced_run(broker.bootstrap, handler, events, rate, seconds, mode, args))

    def pooled(mode: str, name: str) -> list[float]:
        return [x for run in runs if run["mode"] == mode for x in run["series"][name]]

    names = list(runs[0]["series"])
    headers = ["latency, ms", "versions"]
    for mode in modes:
        headers += [f"p50 {mode}", f"p99 {mode}"]
    rows = []
    for name in names:
        row: list[Any] = [name, len(pooled(modes[0], name)) // reps]
        for mode in modes:
            xs = pooled(mode, name)
            row += [fmt(pct(xs, 50)), fmt(pct(xs, 99))]
        rows.append(row)
    md = markdown_table(headers, rows)
    brows = []
    for run in runs:
        b = run["batches"]
        lat = run["series"]["all versions"]
        brows.append(
            [
                run["mode"],
                f"{run['load_1m']:.1f}",
                b["n"],
                fmt(b["records_median"]),
                fmt(b["handle_ms_median"]),
                fmt(b["handle_ms_p99"]),
                " / ".join(fmt(b[f"{k}_ms_median"]) for k in ("process", "flush", "settle")),
                fmt(pct(lat, 50)),
                fmt(pct(lat, 99)),
            ]
        )
    md += "\n" + markdown_table(
        [
            "run (in order)",
            "load 1m",
            "batches",
            "records/batch (median)",
            "handle ms (median)",
            "handle ms (p99)",
            "ms (medians): process / flush wait / settle (with the flush)",
            "p50 ms",
            "p99 ms",
        ],
        brows,
    )
    summary = {
        mode: {
            "p50": pct(pooled(mode, "all versions"), 50),
            "p99": pct(pooled(mode, "all versions"), 99),
        }
        for mode in modes
    }
    main_mode = "natural" if "natural" in modes else modes[0]
    p99 = summary[main_mode]["p99"]
    md += (
        f"\nrate {rate:,.0f} events/s ({'given' if args.rate else 'half the sustainable'}; "
        f"sustainable {sustainable:,.0f} events/s in this run: a worker draining a backlog "
        f"of {len(backlog.records)} events); {runs[0]['events_sent']} "
        f"events over {seconds:.0f} s per run from {events.source}, {args.partitions} "
        f"partitions, batch_max_records 512, batch_timeout_ms {args.batch_timeout_ms}, "
        f"fetch.wait.max.ms {args.fetch_wait_ms or 'the worker default'}; p99 ({main_mode}) "
        f"target <= {TARGET_P99_MS:.0f} ms: "
        f"{'met' if p99 is not None and p99 <= TARGET_P99_MS else 'missed'}\n"
    )
    result = {
        **header("latency.py", argv, torch.device("cpu")),
        "source": events.source,
        "sustainable_events_per_s": sustainable,
        "rate_events_per_s": rate,
        "modes": modes,
        "latency_ms": summary,
        "runs": [
            {
                "mode": run["mode"],
                "load_1m": run["load_1m"],
                "events_sent": run["events_sent"],
                "batches": run["batches"],
                "p99_ms_by_second": run["p99_ms_by_second"],
                "producer_ack_ms": run["producer_ack_ms"],
                "latency_ms": {
                    name: {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99)}
                    for name, xs in run["series"].items()
                },
            }
            for run in runs
        ],
        "batch_timeout_ms": args.batch_timeout_ms,
        "fetch_wait_max_ms": args.fetch_wait_ms or None,
        "target_p99_ms": TARGET_P99_MS,
        "met": p99 is not None and p99 <= TARGET_P99_MS,
    }
    emit(result, md, args.json)
    return result


if __name__ == "__main__":
    main()
