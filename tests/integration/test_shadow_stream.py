"""A shadow method in the worker on the real embedded broker.

EmerG primary, DeepFM shadow, on the tiny world of ``tests/worker_world.py``: the worker
is stopped halfway and restarted from its changelog. The shadow's predictions equal the
offline protocol's DeepFM predictions (each click scored with the φ of the phases before
it; 1e-6), on both sides of the restart (its φ came back from the changelog); the
primary's params equal the offline EmerG φ as without a shadow, and the params topic
carries them only; ``evaluate-stream``'s per-method prequential table shows both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import worker_world as ww
from test_methods_stream import run_in_two_halves

from emerg_stream.config import WorkerSettings
from emerg_stream.features import encode_records, to_torch
from emerg_stream.io.avro import AvroSerde
from emerg_stream.io.records import Interaction, ItemEvent, ItemParams, Prediction
from emerg_stream.meta.checkpoint import load_checkpoint
from emerg_stream.serving.handler import TorchWarmupHandler
from emerg_stream.serving.ranker import flat_features
from emerg_stream.serving.stream_eval import prequential_by_method, prequential_table
from emerg_stream.stream.reader import read_to_end
from emerg_stream.stream.worker import Worker

pytestmark = pytest.mark.integration

ITEM, INTER = AvroSerde(ItemEvent), AvroSerde(Interaction)
PARAMS, PRED = AvroSerde(ItemParams), AvroSerde(Prediction)


@pytest.fixture(scope="module")
def checkpoints(
    world: ww.World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {
        m: ww.build_checkpoint(world, tmp_path_factory.mktemp(m) / "ck", method=m)
        for m in ("emerg", "deepfm")
    }
    torch.set_num_threads(threads)


def offline_scores(world: ww.World, path: Path) -> dict[str, float]:
    """Event id -> the offline protocol's score of each new item's click: the φ after
    the updates before it (one per K rows: cold, warm-a, ...)."""
    ck = load_checkpoint(path)
    phis = ww.offline_phis(world, path)
    items = {r["item_id"]: r for r in world.items}
    seen: dict[str, int] = {}
    rows, phi_rows = [], []
    for r in world.interactions:
        if r["item_id"] not in phis:
            continue
        n = seen.get(r["item_id"], 0)
        seen[r["item_id"]] = n + 1
        rows.append(r)
        phi_rows.append(phis[r["item_id"]][n // world.k])
    flat = [
        {**flat_features(items[r["item_id"]]), **flat_features(r), "user": r["user_id"]}
        | {"item": r["item_id"]}
        for r in rows
    ]
    enc = to_torch(encode_records(ck.meta.spec, flat))
    phi = {k: torch.from_numpy(np.stack([p[k] for p in phi_rows])) for k in ck.model.phi_names}
    with torch.no_grad():
        got = torch.sigmoid(ck.model(enc.tokens, enc.weights, phi)).double().numpy()
    return {r["event_id"]: float(s) for r, s in zip(rows, got, strict=True)}


def test_a_deepfm_shadow_beside_emerg_scores_as_the_offline_protocol_across_a_restart(
    checkpoints: dict[str, Path],
    world: ww.World,
    kafka_conf: dict[str, str],
    bootstrap: str,
    unique_name: Any,
) -> None:
    def worker(settings: WorkerSettings) -> Worker:
        primary = TorchWarmupHandler.from_checkpoint(checkpoints["emerg"], "cpu")
        shadow = TorchWarmupHandler.from_checkpoint(checkpoints["deepfm"], "cpu")
        return Worker(settings, primary, shadow=shadow)

    topics, again = run_in_two_halves(world, kafka_conf, bootstrap, unique_name, worker)
    assert again.restored_items > 0
    assert again.processor.shadow_dropped == 0

    preds = [PRED.decode(m.value()) for m in read_to_end(kafka_conf, topics.predictions)]
    first_of: dict[tuple[str, bool], dict[str, Any]] = {}
    for p in preds:  # at-least-once: a click scored again after the restart counts once
        first_of.setdefault((p["event_id"], p["shadow"]), p)
    shadow = {e: p for (e, s), p in first_of.items() if s}
    primary = {e: p for (e, s), p in first_of.items() if not s}
    assert {p["method"] for p in shadow.values()} == {"deepfm"}
    assert {p["method"] for p in primary.values()} == {"emerg"}
    assert set(shadow) == set(primary) == {r["event_id"] for r in world.interactions}

    for method, got in (("deepfm", shadow), ("emerg", primary)):
        want = offline_scores(world, checkpoints[method])
        rest = world.interactions[len(world.interactions) // 2 :]  # the restored worker's
        after = {r["event_id"] for r in rest} & set(want)
        assert after  # clicks of items whose φ came back from the changelog
        worst = max(abs(got[e]["score"] - s) for e, s in want.items())
        assert worst <= 1e-6, (method, worst)

    params = [PARAMS.decode(m.value()) for m in read_to_end(kafka_conf, topics.item_params)]
    assert params and {r["method"] for r in params} == {"emerg"}  # the primary's only
    offline = ww.offline_phis(world, checkpoints["emerg"])
    worst = max(
        float(
            np.abs(
                np.asarray(r["adjacency"])
                - offline[r["item_id"]][r["version"] - 1]["adj"].reshape(-1)
            ).max()
        )
        for r in params
    )
    assert worst <= 1e-5, worst

    table = prequential_by_method(kafka_conf, topics.predictions)
    assert set(table) == {"emerg", "deepfm (shadow)"}
    assert table["emerg"]["all"]["n"] == table["deepfm (shadow)"]["all"]["n"] == len(primary)
    text = prequential_table(table)
    assert "deepfm (shadow)" in text and "warm_a" in text


def test_the_worker_command_refuses_a_shadow_of_another_split_in_one_line(
    checkpoints: dict[str, Path],
    world: ww.World,
    bootstrap: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from emerg_stream import cli

    other = ww.build_checkpoint(
        dataclasses.replace(world, k=world.k * 2), tmp_path / "ck", method="deepfm"
    )
    monkeypatch.setenv("EMERG_SHADOW_CHECKPOINT", str(other))  # the setting, not the flag
    argv = ["worker", "--checkpoint", str(checkpoints["emerg"]), "--device", "cpu"]
    assert cli.main([*argv, "--bootstrap", bootstrap, "--exit-when-idle", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = next(e for e in err if e.startswith("emerg-stream worker: error:"))
    assert f"split K {2 * world.k} != {world.k} (the update thresholds)" in line
    assert "shadow checkpoint (deepfm, " in line and "the primary (emerg, " in line
