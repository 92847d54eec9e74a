"""PARITY: replaying ml-100k through the broker and the worker reproduces the offline table.

A checkpoint is trained here (one pretraining epoch; parity does not depend on how good
it is), evaluated offline with ``run_phases``, then the worker (``emerg-stream worker``
in a child process) consumes the replayed log and the stream evaluation scores the
held-out rows with the published params. Per phase, the stream AUC must be within 0.1
point of the offline AUC with the same checkpoint and seed. Every registered method
(EmerG, DeepFM, MetaE) runs the same test (the baselines under ``slow``); EmerG also
with the worker's warm-up on ``kernel-bf16`` (AMX bfloat16 products) against an offline
table on that backend, where the CPU has the tiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from emerg_stream.ablations import STRUCTURES
from emerg_stream.config import TopicSettings
from emerg_stream.data import load_dataset, split_log
from emerg_stream.demo import read_outcomes, wait_for_group, worker_process
from emerg_stream.features import FeatureSpec
from emerg_stream.meta.checkpoint import load_checkpoint, save_checkpoint
from emerg_stream.meta.evaluate import PHASES, run_phases
from emerg_stream.meta.kernel.library import cpu_has_bf16_tiles
from emerg_stream.meta.pipeline import prepare, train_model
from emerg_stream.meta.train import TrainConfig
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.methods import METHOD_NAMES
from emerg_stream.serving.stream_eval import comparison_table, evaluate_stream
from emerg_stream.stream.reader import read_to_end
from emerg_stream.stream.replay import replay
from emerg_stream.stream.topics import ensure_topics, load_topic_specs

pytestmark = pytest.mark.integration

SEED = 3
WARMUP = WarmupConfig(steps=5, lr=0.1, optimizer="sgd")


#: EmerG in the default run; the baselines (about 20 s each here) under ``slow``: the
#: default run streams every method on small data (tests/integration/test_methods_stream.py).
PARITY_METHODS = [
    pytest.param(m, marks=() if m == "emerg" else pytest.mark.slow) for m in METHOD_NAMES
]


@pytest.fixture(scope="module", params=PARITY_METHODS)
def trained(
    request: pytest.FixtureRequest, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, dict[str, float]]]:
    method = str(request.param)
    if not (data_dir / "ml-100k").is_dir():
        pytest.skip(f"ml-100k absent from {data_dir}")
    cpu = torch.device("cpu")
    ilog = load_dataset("ml-100k", data_dir)
    split = split_log(ilog)
    spec = FeatureSpec.fit(split.schema, split.old)
    data = prepare(split, spec)
    # one quick pretraining epoch: parity does not depend on how good the model is
    cfg = TrainConfig(seed=SEED, batch_size=2048, pretrain_epochs=1, meta_epochs=0)
    # EmerG with the structure selection chose on ml-100k (joint attention, the whole FM):
    # the stream's warm-up then runs the kernel with every term the offline table used
    overrides = STRUCTURES["joint+fm"] if method == "emerg" else {}
    model = train_model(
        method, spec, data, cfg, device=cpu, progress=False, model_overrides=overrides
    ).eval()
    offline, _ = run_phases(model, data.new, WARMUP, salt=SEED, device=cpu)
    ck_dir = tmp_path_factory.mktemp("parity") / "ck"
    save_checkpoint(
        ck_dir,
        model,
        spec.to_dict(),
        {
            "method": method,
            "dataset": ilog.name,
            "seed": SEED,
            "noise_salt": SEED,
            "warmup": asdict(WARMUP),
            "train_config": asdict(cfg),
            "split": {"n": split.n, "k": split.k},
            "old_item_ids": list(data.old_items.ids),
        },
    )
    return ck_dir, offline


#: The worker's warm-up backend: the default, and bfloat16 tile products where they run.
BACKENDS = [
    "auto",
    pytest.param(
        "kernel-bf16",
        marks=pytest.mark.skipif(not cpu_has_bf16_tiles(), reason="no AMX-BF16 tiles here"),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_reproduces_the_offline_table(
    trained: tuple[Path, dict[str, dict[str, float]]],
    backend: str,
    data_dir: Path,
    kafka_conf: dict[str, str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    ck_dir, offline = trained
    if backend != "auto" and load_checkpoint(ck_dir).meta.method != "emerg":
        pytest.skip("the bfloat16 products are EmerG's joint attention's")
    topics = TopicSettings(
        items=unique_name("items"),
        interactions=unique_name("inter"),
        item_params=unique_name("params"),
        predictions=unique_name("pred"),
        dead_letter=unique_name("dlq"),
        changelog=unique_name("changelog"),
        partitions=2,
    )
    ensure_topics(kafka_conf, load_topic_specs(None, topics))
    env = {f"EMERG_TOPICS__{k.upper()}": v for k, v in topics.names().items()}
    env["EMERG_WARMUP_BACKEND"] = backend
    group, stats = unique_name("group"), tmp_path / "stats.json"
    ilog = load_dataset("ml-100k", data_dir)
    bootstrap = kafka_conf["bootstrap.servers"]
    with worker_process(bootstrap, env, ck_dir, group, stats, "cpu") as worker:
        counts = replay(ilog, kafka_conf, topics.items, topics.interactions)
        wait_for_group(
            kafka_conf,
            group,
            counts.end_offsets,
            timeout_s=600,
            alive=lambda: worker.poll() is None,
        )
    assert worker.returncode == 0
    outcomes = read_outcomes(stats)
    assert outcomes["interactions"]["dead_lettered"] == 0
    assert sum(outcomes["interactions"].values()) == counts.interactions
    assert list(read_to_end(kafka_conf, topics.dead_letter, timeout_s=30)) == []

    ev = evaluate_stream(
        load_checkpoint(ck_dir),
        ilog,
        kafka_conf,
        topics.item_params,
        predictions_topic=topics.predictions,
        timeout_s=120,
        offline=backend != "auto",  # the offline table on the worker's backend
        warmup_backend=backend,  # type: ignore[arg-type]
    )
    if backend == "auto":
        ev.offline = offline
    assert ev.offline is not None
    offline = ev.offline
    print(comparison_table(ev))
    print(json.dumps({"coverage": ev.coverage, "prequential": ev.prequential}))
    assert not ev.missing_items
    for phase in PHASES:
        assert ev.coverage[phase]["published"] == ev.n_items, phase
        assert abs(ev.stream[phase]["auc"] - offline[phase]["auc"]) < 1e-3, phase
    assert ev.prequential is not None
    assert ev.prequential["all"]["n"] == counts.interactions
