"""The shadow method in the worker's batch logic (no broker; real checkpoints).

The primary's outputs are byte for byte those of a processor without a shadow; the
shadow scores every click the primary scores, marked; its φ survives a restore from the
changelog (and is dropped when another shadow checkpoint runs); a shadow that does not
fit the primary is refused in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import worker_world as ww
from test_state_restore import TOPICS, WINDOW, fold, inputs, outputs, processor

from emerg_stream.errors import ConfigError
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.state.codec import ItemStateCodec
from emerg_stream.stream.envelope import Inbound, Outbound
from emerg_stream.stream.processor import WarmupProcessor


@pytest.fixture(scope="module")
def world() -> ww.World:
    return ww.make_world(n_new=6, n_old=1)


@pytest.fixture(scope="module")
def handlers(
    world: ww.World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, TorchWarmupHandler]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name, method, seed in (
        ("emerg", "emerg", 0),
        ("deepfm", "deepfm", 0),
        ("other", "deepfm", 1),
    ):
        ck = ww.build_checkpoint(
            world, tmp_path_factory.mktemp(name) / "ck", method=method, seed=seed
        )
        out[name] = TorchWarmupHandler.from_checkpoint(Path(ck), "cpu")
    yield out
    torch.set_num_threads(threads)


def run(proc: WarmupProcessor, msgs: list[Inbound], size: int = 16) -> list[Outbound]:
    out: list[Outbound] = []
    for i in range(0, len(msgs), size):
        out += proc.process(msgs[i : i + size])[0]
    return out


def is_shadow(o: Outbound) -> bool:
    return o.topic == TOPICS.predictions and outputs([o])[1][0]["shadow"]


def test_the_primarys_outputs_are_unchanged_by_a_shadow(world, handlers):
    msgs = inputs(world)
    plain = processor(handlers["emerg"])
    plain.assign(0, {}, None)
    want = run(plain, msgs)
    both = processor(handlers["emerg"], handlers["deepfm"])
    both.assign(0, {}, None)
    got = run(both, msgs)
    primary = [o for o in got if not is_shadow(o)]
    assert [(o.topic, o.key, o.value) for o in primary] == [(o.topic, o.key, o.value) for o in want]
    params, preds = outputs(got)
    assert {p["method"] for p in params} == {"emerg"}  # the params topic: primary only
    mine = [p for p in preds if not p["shadow"]]
    theirs = [p for p in preds if p["shadow"]]
    assert {p["method"] for p in mine} == {"emerg"} and {p["method"] for p in theirs} == {"deepfm"}
    # every click scored twice, with the same version and phase, other scores
    assert [(p["event_id"], p["params_version"], p["phase"]) for p in theirs] == [
        (p["event_id"], p["params_version"], p["phase"]) for p in mine
    ]
    assert len(theirs) == len(world.interactions)
    assert any(a["score"] != b["score"] for a, b in zip(mine, theirs, strict=True))
    assert both.shadow_auc is not None and len(both.shadow_auc) == len(theirs)


def test_the_shadows_phi_survives_a_restore_and_another_shadows_is_dropped(world, handlers):
    msgs = inputs(world)
    cut = len(msgs) // 2
    ref = processor(handlers["emerg"], handlers["deepfm"])
    ref.assign(0, {}, None)
    run(ref, msgs[:cut])
    changelog = ref.checkpoint().records
    want = outputs(run(ref, msgs[cut:]))[1]
    codec = ItemStateCodec(dedupe_window=WINDOW)

    again = processor(handlers["emerg"], handlers["deepfm"])
    restored = fold(changelog, codec)
    again.assign(0, restored.items, restored.mark)
    got = outputs(run(again, msgs[cut:]))[1]
    assert got == want  # both methods continue exactly
    assert again.shadow_dropped == 0

    other = processor(handlers["emerg"], handlers["other"])
    restored = fold(changelog, codec)
    other.assign(0, restored.items, restored.mark)
    got = outputs(run(other, msgs[cut:]))[1]
    assert [p for p in got if not p["shadow"]] == [p for p in want if not p["shadow"]]
    announced = {m.key.decode() for m in msgs[:cut] if m.topic == TOPICS.items}
    shadowed = {p["item_id"] for p in got if p["shadow"] and p["phase"] != "old"}
    assert shadowed and not shadowed & announced  # restored items: not scored by "other"
    assert other.shadow_dropped > 0


def test_a_shadow_that_does_not_fit_is_refused_in_one_line(world, handlers, tmp_path):
    cases = {
        "split K 5 != 4": dataclasses.replace(world, k=world.k + 1),
        "old item sets differ": dataclasses.replace(world, old_ids=[*world.old_ids, "n0"]),
    }
    for i, (message, bad_world) in enumerate(cases.items()):
        ck = ww.build_checkpoint(bad_world, tmp_path / f"ck{i}", method="deepfm")
        with pytest.raises(ConfigError, match=message) as err:
            processor(handlers["emerg"], TorchWarmupHandler.from_checkpoint(ck, "cpu"))
        assert "\n" not in str(err.value)
