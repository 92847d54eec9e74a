"""Stream overhead: the worker through Kafka against its two halves measured apart.

The same events (the ml-100k replay, or the tests' synthetic world) are produced once to
the embedded broker; then, interleaved and repeated:

(a) **consume + decode**: a plain consumer (assigned, no group) reads both input topics
    and Avro-decodes every record; timed from the first record received;
(b) **process offline**: the worker's :class:`WarmupProcessor` with the torch handler,
    fed the same records from memory in send order, batches of ``batch_max_records``,
    decoding skipped (each record's decoded value is looked up), a checkpoint (changelog
    encoding) after every batch as the worker does; no Kafka;
(c) **worker**: a :class:`Worker` (fresh group and output topics each time) doing all of
    it through Kafka; timed from the start of its first batch until the checkpoint of
    the batch that counted the last record is committed (the stop's drain of the
    checkpoint pipeline; group join and leave left out).

Reported: events/s of each, and ``c / (1 / (1/a + 1/b))``: the worker's rate against
running (a) then (b) back to back (target >= 0.7).

With ``--shadow-checkpoint`` (a second checkpoint of the same split), (b) and (c) are
also run with it as the worker's shadow method (docs/DEPLOYMENT.md, Shadow method), in
the same reps, interleaved: the cost of the shadow is the ratio of the two in one run.

    python benchmarks/stream_throughput.py            # the whole ml-100k replay
    python benchmarks/stream_throughput.py --quick    # 5,000 interactions, 1 rep
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from benchmarks import stream_inputs as si
from benchmarks.common import (
    base_parser,
    emit,
    fmt,
    header,
    markdown_table,
    setup,
)
from emerg_stream.config import TopicSettings
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent
from emerg_stream.meta.warmup import BACKENDS
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.decode import Rejected
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.processor import WarmupProcessor
from emerg_stream.stream.reader import reader_conf
from emerg_stream.stream.worker import Worker

TARGET = 0.7


def consume_decode(conf: dict[str, str], topics: TopicSettings, n: int) -> tuple[int, float]:
    """(a): read every input record from the beginning and decode it.

    Returns:
        Records read, and seconds from the first record received to the last (the
        assignment's first fetch left out, as for the worker).
    """
    serdes: dict[str, AvroSerde[Any]] = {
        topics.items: AvroSerde(ItemEvent),
        topics.interactions: AvroSerde(Interaction),
    }
    c = Consumer(reader_conf({**conf, "fetch.max.bytes": str(50 << 20)}))
    parts = topics.partitions or 1
    c.assign(
        [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t in (topics.items, topics.interactions)
            for p in range(parts)
        ]
    )
    got = 0
    deadline = time.monotonic() + 300
    t0: float | None = None
    try:
        while got < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"consume timed out at {got}/{n}")
            msgs = c.consume(1000, timeout=0.5)
            if msgs and t0 is None:
                t0 = time.perf_counter()
            for m in msgs:
                if m.error() is None:
                    serdes[m.topic()].decode(m.value())
                    got += 1
        took = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        c.close()
    return got, took


class _Predecoded:
    """Stands in for the processor's RecordDecoder: the records are decoded already."""

    def __init__(self, decoded: dict[tuple[str, int, int], Any]) -> None:
        self.decoded = decoded

    def item(self, msg: Inbound) -> Any:
        return self.decoded[(msg.topic, msg.partition, msg.offset)]

    def interaction(self, msg: Inbound) -> Any:
        return self.decoded[(msg.topic, msg.partition, msg.offset)]


def process_offline(
    handler: TorchWarmupHandler,
    topics: TopicSettings,
    inbound: Sequence[Inbound],
    decoded: dict[tuple[str, int, int], Any],
    batch: int,
    shadow: TorchWarmupHandler | None = None,
) -> int:
    """(b): the worker's processor on in-memory records; returns records counted."""
    proc = WarmupProcessor(
        handler,
        topics,
        dedupe_window=1000,
        pending_max=10_000,
        pending_max_age_ms=3_600_000,
        shadow=shadow,
    )
    proc.decoder = _Predecoded(decoded)  # type: ignore[assignment]
    for p in range(topics.partitions or 1):
        proc.assign(p, {}, None)
    for i in range(0, len(inbound), batch):
        proc.process(inbound[i : i + batch])
        proc.checkpoint()
    return proc.counts.total("items") + proc.counts.total("interactions")


def run_worker(
    handler: TorchWarmupHandler,
    bootstrap: str,
    inputs: TopicSettings,
    n: int,
    batch: int,
    guarantee: str = "at_least_once",
    shadow: TorchWarmupHandler | None = None,
) -> tuple[float, dict[str, Any]]:
    """(c): a worker through Kafka; returns (seconds first batch -> last record, stats)."""
    conf = {"bootstrap.servers": bootstrap}
    topics = si.outputs_like(conf, inputs, "w")
    settings = si.worker_settings(
        bootstrap,
        topics,
        f"bench-{uuid.uuid4().hex[:8]}",
        batch_max_records=batch,
        processing_guarantee=guarantee,
    )
    worker = Worker(settings, handler, shadow=shadow)
    marks: dict[str, float] = {}
    handle = worker._handle

    def timed(b: list[Inbound]) -> None:
        marks.setdefault("first", time.perf_counter())
        handle(b)
        if worker.counts.total("items") + worker.counts.total("interactions") >= n:
            marks.setdefault("done", time.perf_counter())
            worker.stop()

    drain = worker._checkpoint

    def drained(**kw: Any) -> None:  # the stop's drain: the last records are committed
        drain(**kw)
        if "done" in marks:
            marks.setdefault("drained", time.perf_counter())

    worker._handle = timed  # type: ignore[method-assign]
    worker._checkpoint = drained  # type: ignore[method-assign]
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(900)
    if thread.is_alive() or "drained" not in marks:
        worker.stop()
        raise RuntimeError("the worker did not finish")
    return marks["drained"] - marks["first"], {"batches": worker.batches, "pauses": worker.pauses}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    si.add_arguments(p)
    p.add_argument("--batch", type=int, default=512, help="batch_max_records (worker default)")
    p.add_argument(
        "--warmup-backend",
        choices=BACKENDS,
        default="auto",
        help="the worker's warmup_backend setting for (b) and (c)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run (b)'s first rep under cProfile and print its N costliest calls (cumulative)",
    )
    p.add_argument(
        "--cases", default="abc", help="which of a, b, c to run (the ratio needs all three)"
    )
    p.add_argument(
        "--shadow-checkpoint",
        type=Path,
        default=None,
        help="also run (b) and (c) with this checkpoint as the worker's shadow method",
    )
    args = p.parse_args(argv)
    if args.threads <= 0:
        args.threads = 1  # the worker job's default (--torch-threads 1)
    setup(args)
    reps = args.reps or (1 if args.quick else 3)
    limit = 5000 if args.quick and not args.limit else args.limit
    events = si.load_events(limit, args.checkpoint)
    handler = TorchWarmupHandler.from_checkpoint(
        events.checkpoint, "cpu", warmup_backend=args.warmup_backend
    )
    n = len(events.records)
    shadow = None
    if args.shadow_checkpoint is not None:
        shadow = TorchWarmupHandler.from_checkpoint(
            args.shadow_checkpoint, "cpu", warmup_backend=args.warmup_backend
        )
    cases = [c for c in "abc" if c in args.cases]
    if shadow is not None:
        cases += [f"{c}+" for c in "bc" if c in args.cases]

    samples: dict[str, list[float]] = {c: [] for c in cases}
    extra: dict[str, Any] = {}
    with si.start_broker(args.broker) as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        inputs = si.fresh_topics(conf, args.partitions, "in")
        inbound, produce_s = si.produce_all(conf, inputs, events)
        decoded = {
            (m.topic, m.partition, m.offset): rec
            for m, (_, _, rec, _) in zip(inbound, events.records, strict=True)
        }
        assert not any(isinstance(v, Rejected) for v in decoded.values())
        consume_decode(conf, inputs, n)  # warm-up: page cache, code paths
        process_offline(handler, inputs, inbound[: min(n, 2000)], decoded, args.batch)
        if shadow is not None:
            process_offline(handler, inputs, inbound[: min(n, 2000)], decoded, args.batch, shadow)
        for rep in range(reps):
            order = cases if rep % 2 == 0 else cases[::-1]
            for case in order:
                with_shadow = shadow if case.endswith("+") else None
                if case == "a":
                    got, took = consume_decode(conf, inputs, n)
                    samples["a"].append(took)
                elif case.startswith("b"):
                    profiler = cProfile.Profile() if args.profile and rep == 0 else None
                    t0 = time.perf_counter()
                    if profiler is not None:
                        profiler.enable()
                    got = process_offline(
                        handler, inputs, inbound, decoded, args.batch, with_shadow
                    )
                    samples[case].append(time.perf_counter() - t0)
                    if profiler is not None:
                        profiler.disable()
                        pstats.Stats(profiler, stream=sys.stderr).sort_stats(
                            "cumulative"
                        ).print_stats(args.profile)
                else:
                    took, extra = run_worker(
                        handler,
                        broker.bootstrap,
                        inputs,
                        n,
                        args.batch,
                        args.guarantee,
                        with_shadow,
                    )
                    samples[case].append(took)
                    got = n
                if got != n:
                    raise RuntimeError(f"{case}: {got} records of {n}")
    rate = {k: n / statistics.median(v) for k, v in samples.items() if v}
    full = all(k in rate for k in "abc")
    ideal = 1.0 / (1.0 / rate["a"] + 1.0 / rate["b"]) if full else None
    ratio = rate["c"] / ideal if ideal else None
    names = {
        "a": "(a) consume + Avro decode",
        "b": "(b) process offline (score + warm-up, no Kafka)",
        "c": "(c) worker through Kafka",
        "b+": "(b) process offline, with the shadow method",
        "c+": "(c) worker through Kafka, with the shadow method",
    }
    rows = [[names[k], fmt(rate[k]), fmt(statistics.median(samples[k]))] for k in rate]
    md = ""
    if ratio is not None:
        rows.append(["1/(1/a + 1/b): (a) then (b)", fmt(ideal), "-"])
        md = (
            f"\nratio c / (1/(1/a+1/b)) = **{ratio:.2f}** (target >= {TARGET}: "
            f"{'met' if ratio >= TARGET else 'missed'})"
        )
    shadow_cost = {c: rate[f"{c}+"] / rate[c] for c in "bc" if c in rate and f"{c}+" in rate}
    for c, r in shadow_cost.items():
        md += f"\nwith the shadow / without, ({c}): **{r:.2f}**"
    md = markdown_table(["case", "events/s (median)", "seconds (median)"], rows) + md
    md += (
        f"\n{n} events ({events.n_items} items, {events.n_interactions} interactions) from "
        f"{events.source}, {args.partitions} partitions, batch {args.batch}, {reps} reps; "
        f"broker {args.broker}, {args.guarantee}; "
        f"pre-produce {produce_s:.1f}s; torch threads {torch.get_num_threads()}\n"
    )
    result = {
        **header("stream_throughput.py", argv, torch.device("cpu")),
        "events": n,
        "items": events.n_items,
        "interactions": events.n_interactions,
        "source": events.source,
        "partitions": args.partitions,
        "batch": args.batch,
        "reps": reps,
        "seconds": samples,
        "events_per_s": rate,
        "ideal_events_per_s": ideal,
        "ratio": ratio,
        "target": TARGET,
        "met": ratio is not None and ratio >= TARGET,
        "worker_last_run": extra,
        "warmup_backend": args.warmup_backend,
        "broker": args.broker,
        "guarantee": args.guarantee,
        "shadow_checkpoint": None if shadow is None else str(args.shadow_checkpoint),
        "shadow_over_plain": shadow_cost,
    }
    emit(result, md, args.json)
    return result


if __name__ == "__main__":
    main()
