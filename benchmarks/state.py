"""Worker state: resident bytes per item and restore speed from the changelog.

Builds ``--items`` item states as the worker holds them at their fullest: ``K-1`` rows in
the support buffer (the most it holds between updates; K from the checkpoint), a common
phase item that has seen ``5K-1`` clicks (all their event ids in the de-duplication
window), φ of the checkpoint's shape, side features and user features of real replay
records.

Bytes per item, each measured in a forked child that allocates nothing else (growth of
``/proc/self/statm`` RSS while holding the items, gc before and after):

* **before**: the in-memory layout up to ItemState v1 (event ids as ``str`` in a
  ``deque`` + ``set``, one ``bytes`` per support row, two float32 arrays, a slotted
  dataclass), re-created here as ``Legacy*`` for the comparison;
* **after**: :class:`~emerg_stream.state.ItemTask` (hashed ids, packed rows, φ bytes);
* **restored, lazy**: what :func:`restore_partitions` returns (raw values only);
* **restored, decoded**: the same after decoding every item (``ItemMap.load_all``);
* the worst case of a full de-duplication window (``--dedupe-window`` ids) on a sample;
* the cost of remembering a new event id, before and after (interleaved, median).

Restore: every state is produced to a changelog topic (2 partitions, a partition mark
each) in the current format and, to a second topic, in the old format (ItemState v1, ids
as strings); then per rep, interleaved, the worker's ``restore_partitions`` (read to the
end + fold; lazy) and the decoding of every item afterwards, timed apart.
Targets: <= 4 KiB per item, restore >= 50,000 items/s.

    python benchmarks/state.py            # 100,000 items
    python benchmarks/state.py --quick    # 10,000 items
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastavro
import torch

from benchmarks import stream_inputs as si
from benchmarks.common import (
    base_parser,
    emit,
    fmt,
    header,
    markdown_table,
    setup,
)
from benchmarks.state_layout import (
    PARTITIONS,
    Spec,
    build,
    bytes_per_item,
    dedupe_add_us,
    encode_v1,
    event_ids,
    rss_bytes,
)
from emerg_stream.io.schemas import load_schema
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state import ItemMap
from emerg_stream.state.codec import ItemStateCodec

TARGET_BYTES = 4096
TARGET_RESTORE = 50_000.0


def in_child(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child (fresh allocator state) and return its result."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=lambda: q.put(fn()))
    proc.start()
    out = q.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"child failed ({proc.exitcode})")
    return out


def produce_changelogs(
    conf: dict[str, str], n: int, spec: Spec, codec: ItemStateCodec, recent: int, model: str
) -> dict[str, Any]:
    """Both changelog topics (current format, v1) and encoding figures (run it in a child)."""
    from confluent_kafka import Producer

    from emerg_stream.stream.checkpointing import MARK_KEY, PartitionMark
    from emerg_stream.stream.metrics import OutcomeCounts

    tasks = build(n, spec, codec, recent)
    t0 = time.perf_counter()
    values = [codec.encode(t) for t in tasks.values()]
    encode_s = time.perf_counter() - t0
    v1_schema = json.loads(json.dumps(load_schema("ItemState", 1)).replace("timestamp-millis", "x"))
    parsed = fastavro.parse_schema(v1_schema, named_schemas={})
    topics = {}
    p = Producer({**conf, "linger.ms": 20, "enable.idempotence": True})
    for fmt_name in ("current", "v1"):
        topic = si.fresh_topics(conf, PARTITIONS, "st").changelog
        topics[fmt_name] = topic
        for i, (task, value) in enumerate(zip(tasks.values(), values, strict=True)):
            if fmt_name == "v1":
                value = encode_v1(task, event_ids(i, spec.k, recent), codec, parsed)
            p.produce(topic, value, task.item_id.encode(), i % PARTITIONS)
            if i % 5000 == 4999 and p.flush(120):  # as checkpoints do: flushed in steps
                raise RuntimeError("changelog not delivered")
        for part in range(PARTITIONS):
            counts = {"items": n, "interactions": n}
            mark = PartitionMark(part, model, counts, [], 0, OutcomeCounts(), 0)
            p.produce(topic, mark.encode(), MARK_KEY, part)
        if p.flush(300):
            raise RuntimeError("changelog not delivered")
    return {
        "topics": topics,
        "encoded": statistics.mean(len(v) for v in values),
        "encode_items_per_s": n / encode_s,
    }


def restore(consumer: Any, topic: str, codec: ItemStateCodec) -> list[ItemMap]:
    """The worker's restore of every partition of ``topic`` (lazy item maps)."""
    from emerg_stream.stream.changelog import restore_partitions

    out = restore_partitions(consumer, topic, list(range(PARTITIONS)), codec, timeout_s=600)
    return [r.items for r in out.values()]


#: The restore consumer's fetch wait proposed for the worker (librdkafka's default: 500).
PROPOSED_FETCH_WAIT_MS = 10


def reader(conf: dict[str, str], fetch_wait_ms: int | None = None) -> Any:
    """A consumer like the worker's restore consumer (made once, reused per restore).

    ``fetch_wait_ms`` sets ``fetch.wait.max.ms``: with the default, the end-offset query
    of every restore after the first waits for the previous restore's last fetch, which
    the broker holds until that wait runs out.
    """
    from confluent_kafka import Consumer

    from emerg_stream.stream.reader import reader_conf

    extra = {} if fetch_wait_ms is None else {"fetch.wait.max.ms": str(fetch_wait_ms)}
    return Consumer({**reader_conf(conf), **extra})


def restored_bytes(conf: dict[str, str], topic: str, codec: ItemStateCodec) -> dict[str, float]:
    """RSS per item of a restore, lazy and then decoded (run it in a child)."""
    consumer = reader(conf)
    gc.collect()
    before = rss_bytes()
    maps = restore(consumer, topic, codec)
    gc.collect()
    lazy = rss_bytes() - before
    n = sum(len(m) for m in maps)
    raw = sum(m.raw_bytes for m in maps)
    for m in maps:
        m.load_all()
    gc.collect()
    return {"lazy": lazy / n, "raw_value": raw / n, "decoded": (rss_bytes() - before) / n}


def timed_restore(
    consumer: Any, topic: str, codec: ItemStateCodec, n: int, *, decode: bool = True
) -> list[float]:
    """Seconds of the (lazy) restore and of decoding every item afterwards (0 if not)."""
    gc.collect()
    t0 = time.perf_counter()
    maps = restore(consumer, topic, codec)
    t1 = time.perf_counter()
    got = sum(len(m) for m in maps)
    if got != n:
        raise RuntimeError(f"restored {got} items of {n}")
    if decode:
        for m in maps:
            m.load_all()
    t2 = time.perf_counter()
    del maps
    return [t1 - t0, t2 - t1]


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
    spec = Spec(
        items=[r for kind, _, r, _ in events.records if kind == "item"],
        clicks=[r for kind, _, r, _ in events.records if kind == "interaction"],
        k=handler.k,
        f=handler.n_fields,
        d=handler.dim,
    )
    k, window = spec.k, args.dedupe_window
    recent = min(5 * k - 1, window)
    codec = ItemStateCodec(dedupe_window=window)
    sample = min(n, 2000)

    rss: dict[str, float] = {}
    for name, legacy in (("before", True), ("after", False)):
        rss[name] = in_child(lambda lg=legacy: bytes_per_item(n, spec, codec, recent, lg))
        rss[f"{name}_full"] = in_child(
            lambda lg=legacy: bytes_per_item(sample, spec, codec, window, lg)
        )
    dedupe_us = dedupe_add_us(window, max(reps, 3))
    full = build(1, spec, codec, window)
    enc_full = len(codec.encode(next(iter(full.values()))))

    from emerg_stream.stream.broker import EmbeddedBroker

    times: dict[str, list[list[float]]] = {"current": [], "v1": [], "current_wait": []}
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        made = in_child(
            lambda: produce_changelogs(conf, n, spec, codec, recent, handler.model_version)
        )
        topics = made["topics"]
        restored = in_child(lambda: restored_bytes(conf, topics["current"], codec))
        consumer, proposed = reader(conf), reader(conf, PROPOSED_FETCH_WAIT_MS)
        try:
            for _ in range(reps):
                for name in ("current", "v1"):
                    times[name].append(timed_restore(consumer, topics[name], codec, n))
                times["current_wait"].append(
                    timed_restore(proposed, topics["current"], codec, n, decode=False)
                )
        finally:
            consumer.close()
            proposed.close()

    def rate(name: str, step: int) -> float:
        return n / statistics.median(t[step] for t in times[name])

    restore_rate, decode_rate = rate("current", 0), rate("current", 1)
    v1_restore, v1_decode = rate("v1", 0), rate("v1", 1)
    wait_restore = rate("current_wait", 0)
    met_rss = rss["after"] <= TARGET_BYTES and restored["decoded"] <= TARGET_BYTES

    def ok(x: bool) -> str:
        return "met" if x else "missed"

    rows = [
        ["changelog value (encoded ItemState v2)", fmt(made["encoded"]), fmt(TARGET_BYTES), ""],
        ["RSS per item, before (layout up to v1)", fmt(rss["before"]), fmt(TARGET_BYTES), ""],
        ["RSS per item, after (ItemTask)", fmt(rss["after"]), fmt(TARGET_BYTES), ""],
        ["RSS per item, restored, lazy (raw values)", fmt(restored["lazy"]), fmt(TARGET_BYTES), ""],
        ["RSS per item, restored, every item decoded", fmt(restored["decoded"]), "4,096", ""],
        [f"full window ({window} ids): encoded", fmt(enc_full), "-", ""],
        [f"full window ({window} ids): RSS before", fmt(rss["before_full"]), "-", ""],
        [f"full window ({window} ids): RSS after", fmt(rss["after_full"]), "-", ""],
    ]
    rows[2][3] = ok(rss["after"] <= TARGET_BYTES)
    rows[3][3] = ok(restored["lazy"] <= TARGET_BYTES)
    rows[4][3] = ok(restored["decoded"] <= TARGET_BYTES)
    md = markdown_table(["bytes per item", "value", "target", ""], rows)
    md += "\n" + markdown_table(
        ["changelog, items/s (median)", "restore (read + fold, lazy)", "decode every item after"],
        [
            [f"current format (v2), {n:,} items", fmt(restore_rate), fmt(decode_rate)],
            [f"old format (v1, ids as strings), {n:,} items", fmt(v1_restore), fmt(v1_decode)],
            [
                f"current format, restore consumer with fetch.wait.max.ms={PROPOSED_FETCH_WAIT_MS}",
                fmt(wait_restore),
                "-",
            ],
        ],
    )
    md += "\n" + markdown_table(
        ["dedupe add of a new id, µs (median)", "before (str set)", "after (hash ring)"],
        [
            [
                f"{label}",
                f"{dedupe_us['before'][key]:.2f}",
                f"{dedupe_us['after'][key]:.2f}",
            ]
            for key, label in (("first_49", "first 49 ids"), ("full", f"full ({window} ids)"))
        ],
    )
    md += (
        f"\nrestore target {fmt(TARGET_RESTORE)} items/s: {ok(restore_rate >= TARGET_RESTORE)}; "
        f"{PARTITIONS} partitions, {reps} reps; raw value {fmt(restored['raw_value'])} B/item\n"
        f"K={k}, F={spec.f}, D={spec.d}: {k - 1} support rows, {recent} event ids per item; "
        f"encode {made['encode_items_per_s']:,.0f} items/s; source {events.source}; "
        f"load avg 1m at end {os.getloadavg()[0]:.2f}\n"
    )
    result = {
        **header("state.py", argv, torch.device("cpu")),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "items": n,
        "k": k,
        "n_fields": spec.f,
        "dim": spec.d,
        "encoded_bytes_per_item": made["encoded"],
        "rss_bytes_per_item": rss["after"],
        "rss_bytes_per_item_before": rss["before"],
        "rss_bytes_per_item_restored_lazy": restored["lazy"],
        "rss_bytes_per_item_restored_decoded": restored["decoded"],
        "raw_value_bytes_per_item": restored["raw_value"],
        "full_dedupe_encoded_bytes_per_item": enc_full,
        "full_dedupe_rss_bytes_per_item": rss["after_full"],
        "full_dedupe_rss_bytes_per_item_before": rss["before_full"],
        "encode_items_per_s": made["encode_items_per_s"],
        "dedupe_add_us": dedupe_us,
        "restore_s": [t[0] for t in times["current"]],
        "decode_all_s": [t[1] for t in times["current"]],
        "restore_v1_s": [t[0] for t in times["v1"]],
        "decode_all_v1_s": [t[1] for t in times["v1"]],
        "restore_items_per_s": restore_rate,
        "decode_items_per_s": decode_rate,
        "restore_v1_items_per_s": v1_restore,
        "decode_v1_items_per_s": v1_decode,
        "restore_fetch_wait_s": [t[0] for t in times["current_wait"]],
        "restore_fetch_wait_items_per_s": wait_restore,
        "proposed_fetch_wait_ms": PROPOSED_FETCH_WAIT_MS,
        "targets": {"bytes_per_item": TARGET_BYTES, "restore_items_per_s": TARGET_RESTORE},
        "met": {
            "bytes_encoded": made["encoded"] <= TARGET_BYTES,
            "bytes_rss": met_rss,
            "restore": restore_rate >= TARGET_RESTORE,
        },
    }
    emit(result, md, args.json)
    return result


if __name__ == "__main__":
    main()
