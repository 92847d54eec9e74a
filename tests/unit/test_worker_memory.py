"""Memory under a flood (slow): 200,000 new items that never get a click, plus clicks of
items never announced, through the worker's batch logic (no broker).

Item state is the pipeline's state and grows with the items (reported per item); the
pending buffer stays within its bound and the overflow goes to the dead-letter topic
(``unknown_item``), each overflowed click counted once. Peak RSS is printed (``-s``).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import worker_world as ww

from emerg_stream.config import TopicSettings
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import DeadLetter, Interaction, ItemEvent
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.stream.envelope import Inbound
from emerg_stream.stream.processor import WarmupProcessor

TOPICS = TopicSettings()
ITEM, INTER, DEAD = AvroSerde(ItemEvent), AvroSerde(Interaction), AvroSerde(DeadLetter)
N_ITEMS = 200_000
N_ORPHANS = 20_000
PENDING_MAX = 1_000
BATCH = 2_000


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchWarmupHandler]:
    world = ww.make_world(n_new=3, n_old=1)
    ck = ww.build_checkpoint(world, tmp_path_factory.mktemp("ck") / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchWarmupHandler.from_checkpoint(Path(ck), "cpu")
    torch.set_num_threads(threads)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_200k_unclicked_items_and_a_flood_of_orphan_clicks_stay_bounded(handler):
    world = ww.make_world(n_new=3, n_old=1)
    item0, click0 = world.items[0], world.interactions[0]
    proc = WarmupProcessor(
        handler,
        TOPICS,
        dedupe_window=100,
        pending_max=PENDING_MAX,
        pending_max_age_ms=10**12,
        clock=lambda: 1_800_000_000.0,
    )
    proc.assign(0, {}, None)
    rss0 = rss_mib()
    t0 = time.monotonic()
    dead = 0
    max_pending = 0
    for start in range(0, N_ITEMS, BATCH):
        msgs = [
            Inbound(TOPICS.items, 0, i, b"k", ITEM.encode(dict(item0, item_id=f"new-{i}")))
            for i in range(start, min(start + BATCH, N_ITEMS))
        ]
        j0 = start * N_ORPHANS // N_ITEMS
        j1 = (start + BATCH) * N_ORPHANS // N_ITEMS
        msgs += [
            Inbound(
                TOPICS.interactions,
                0,
                j,
                b"k",
                INTER.encode(dict(click0, item_id=f"ghost-{j}", event_id=f"g{j}")),
            )
            for j in range(j0, j1)
        ]
        out, _ = proc.process(msgs)
        dead += sum(1 for o in out if o.topic == TOPICS.dead_letter)
        max_pending = max(max_pending, len(proc.pending))
        proc.checkpoint()
    took = time.monotonic() - t0
    peak = rss_mib()

    c = proc.counts
    assert c.items["applied"] == N_ITEMS
    assert max_pending <= PENDING_MAX
    assert len(proc.pending) == PENDING_MAX
    assert c.interactions == {
        "applied": 0,
        "duplicate": 0,
        "dead_lettered": N_ORPHANS - PENDING_MAX,
        "ignored_old_item": 0,
        "conflicting_item": 0,
        "conflicting_event": 0,
    }
    assert dead == N_ORPHANS - PENDING_MAX
    per_item = (peak - rss0) * 1024 * 1024 / N_ITEMS
    print(
        f"\n[memory] {N_ITEMS} items + {N_ORPHANS} orphan clicks in {took:.0f}s; pending "
        f"max {max_pending} (bound {PENDING_MAX}); dead-lettered {dead}; peak RSS "
        f"{peak:.0f} MiB (start {rss0:.0f} MiB, ~{per_item:.0f} B per item in state)"
    )
