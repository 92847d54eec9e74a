"""``emerg-stream status``: how far behind the worker group is, and where the items are.

Prints the group's lag per input partition (true end minus committed offset; the end is
read robustly to Tansu's short ``ListOffsets`` answers, see
:mod:`emerg_stream.stream.lag`), split into *behind* (records the worker has not
processed) and *held* (processed, but the committed offset waits at an interaction whose
item is not announced yet, with the number of such orphans and the event-time age of the
oldest; from the partition marks of the changelog), and the number of items per phase: the compacted
item-params topic read to its end with the bounded reader, the newest version of each
item counted. Read-only: it never joins the group or commits.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emerg_stream.stream.lag import PartitionLag, SplitLag

HELP = "Show the worker group's lag per partition and the number of items per phase."
#: No torch here: the command line does not import it to set its threads.
USES_TORCH = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", default=None, help="worker consumer group (EMERG_GROUP_ID)")
    parser.add_argument("--bootstrap", default=None, help="bootstrap servers (overrides settings)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each read, s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import json
    from typing import Any

    from emerg_stream.config import WorkerSettings, load_settings
    from emerg_stream.stream.lag import group_lag, last_marks, split_lag

    overrides: dict[str, Any] = {}
    if args.group:
        overrides["group_id"] = args.group
    if args.bootstrap:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    settings = load_settings(WorkerSettings, overrides)
    conf = settings.kafka.as_librdkafka()
    conf.pop("partition.assignment.strategy", None)
    topics = settings.topics
    lags = group_lag(
        conf, settings.group_id, [topics.items, topics.interactions], timeout_s=args.timeout
    )
    marks = last_marks(conf, topics.changelog, timeout_s=args.timeout)
    roles = {topics.items: "items", topics.interactions: "interactions"}
    split = [split_lag(x, marks.get(x.partition), roles[x.topic]) for x in lags]
    n_items, phases = _item_phases(conf, topics.item_params, args.timeout)

    if args.json:
        out = {
            "group": settings.group_id,
            "lag": [
                {
                    "topic": x.topic,
                    "partition": x.partition,
                    "committed": x.committed,
                    "end": x.end,
                    "lag": x.lag,
                    "behind": s.behind,
                    "held": s.held,
                    "pending": s.pending,
                    "oldest_pending_age_ms": s.oldest_pending_age_ms,
                }
                for x, s in zip(lags, split, strict=True)
            ],
            "total_lag": sum(x.lag for x in lags),
            "total_behind": sum(s.behind for s in split),
            "total_held": sum(s.held for s in split),
            "items": n_items,
            "phases": dict(sorted(phases.items())),
        }
        print(json.dumps(out, indent=1))
        return 0
    _print_table(settings.group_id, topics.item_params, lags, split, n_items, phases)
    return 0


def _item_phases(conf: dict[str, str], topic: str, timeout_s: float) -> tuple[int, Counter[str]]:
    """Items in the params topic (newest version each, tombstones applied) and their phases."""
    from emerg_stream.io.avro import AvroSerde
    from emerg_stream.io.records import ItemParams
    from emerg_stream.stream.reader import read_to_end

    serde: AvroSerde[ItemParams] = AvroSerde(ItemParams, topic=topic)
    latest: dict[str, tuple[int, str]] = {}
    for msg in read_to_end(conf, topic, timeout_s=timeout_s):
        key, value = msg.key(), msg.value()
        if value is None:
            if key is not None:
                latest.pop(key.decode(), None)  # a tombstone deletes the item
            continue
        rec = serde.decode(value)
        seen = latest.get(rec["item_id"])
        if seen is None or rec["version"] >= seen[0]:
            latest[rec["item_id"]] = (rec["version"], rec["phase"])
    return len(latest), Counter(phase for _, phase in latest.values())


def _print_table(
    group: str,
    topic: str,
    lags: list[PartitionLag],
    split: list[SplitLag],
    n_items: int,
    phases: Counter[str],
) -> None:
    """The human-readable status: lag per partition, then items per phase."""
    print(f"group {group}")
    head = f"{'topic':<32} {'partition':>9} {'committed':>10} {'end':>10} {'lag':>8}"
    print(f"{head} {'behind':>8} {'held':>8}  held by")
    for x, s in zip(lags, split, strict=True):
        committed = "-" if x.committed is None else str(x.committed)
        by = ""
        if s.pending:
            age = (
                "" if s.oldest_pending_age_ms is None else f", oldest {s.oldest_pending_age_ms} ms"
            )
            by = f"{s.pending} pending orphans{age}"
        print(
            f"{x.topic:<32} {x.partition:>9} {committed:>10} {x.end:>10} {x.lag:>8} "
            f"{s.behind:>8} {s.held:>8}  {by}"
        )
    print(
        f"total lag {sum(x.lag for x in lags)}: behind {sum(s.behind for s in split)}, "
        f"held by pending orphans {sum(s.held for s in split)}"
    )
    print(f"items {n_items} in {topic}")
    for phase, n in sorted(phases.items()):
        print(f"  {phase:<10} {n:>8}")
