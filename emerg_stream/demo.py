"""The end-to-end demo: train, stream, warm up, and check the stream against the offline run.

One call (:func:`run_demo`, the ``emerg-stream demo`` command) does, on ``ml-100k``:

1. starts the embedded broker on 127.0.0.1 and creates the six topics;
2. trains EmerG with the offline protocol (``meta.reproduce``, one method, one seed) or
   reuses the checkpoint cached under ``<work-dir>/run-<key>``, where the key hashes the
   dataset's input files and the training config;
3. starts the worker (``emerg-stream worker`` in a child process, on the demo's
   broker and topics, with that checkpoint);
4. replays the log (held-out test rows left out);
5. waits until the worker's consumer group has committed every replayed record (lag 0:
   the worker flushes its outputs before it commits, so every params version is
   published by then);
6. runs the stream evaluation and prints its per-phase table next to the offline one,
   plus the counts: events in, and the worker's outcomes (applied, duplicates,
   dead-lettered, ignored old items) from its stats file.

Ctrl-C (or SIGTERM) at any point stops the worker (SIGTERM: it checkpoints and closes)
and the broker, and leaves nothing running: during training it interrupts at once;
once Kafka clients run it sets ``stop``, which the replay and the wait for the worker
watch, and :func:`run_demo` unwinds through the context managers that hold the worker
and the broker (a second Ctrl-C forces a ``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from emerg_stream.errors import ConfigError, EmergError, TransientError

__all__ = [
    "DemoOptions",
    "DemoResult",
    "StoppedError",
    "cache_key",
    "read_outcomes",
    "run_demo",
    "wait_for_group",
    "worker_process",
]

log = structlog.get_logger(__name__)

METHOD = "emerg"


class StoppedError(EmergError):
    """The demo was interrupted (Ctrl-C / SIGTERM)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs.

    Args:
        dataset: Dataset preset or YAML.
        data_dir: Folder of the dataset folders (default: ``$EMERG_DATA_DIR``).
        work_dir: Where checkpoints and results are cached.
        reuse: Reuse a cached checkpoint of the same dataset and config if present.
        pretrain_epochs: Max pretraining epochs of model selection (and the final run).
        meta_epochs: Max meta-training epochs.
        partitions: Partitions of every topic (items and interactions co-partitioned).
        worker_timeout_s: Longest wait for the worker to catch up with the replay.
        device: ``auto``, ``cpu`` or ``cuda`` (training and worker).
        progress: Show progress bars.
        speed: Replay speed: ``None`` as fast as possible, else event-time gaps are
            divided by it (see :func:`emerg_stream.stream.replay.replay`).
    """

    dataset: str = "ml-100k"
    data_dir: str | None = None
    work_dir: Path = Path(".cache/demo")
    reuse: bool = False
    pretrain_epochs: int = 1
    meta_epochs: int = 1
    partitions: int = 2
    worker_timeout_s: float = 900.0
    device: str = "auto"
    progress: bool = True
    speed: float | None = None


@dataclass
class DemoResult:
    """What the demo measured.

    Args:
        checkpoint: The checkpoint directory used.
        reused: Whether it came from the cache.
        train_seconds: Training time (0 when reused).
        offline: phase -> metrics of the offline protocol on that checkpoint (phase_metrics).
        stream: The stream evaluation (``StreamEvaluation.to_dict()``).
        replay: Replay counts (items, interactions, test rows left out).
        outcomes: Worker outcome counts per input topic role, from its metrics.
        dead_letters: Records in the dead-letter topic.
        seconds: Stage -> wall seconds.
    """

    checkpoint: str
    reused: bool
    train_seconds: float
    offline: dict[str, dict[str, float]]
    stream: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_letters: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def cache_key(dataset: str, sources: Mapping[str, str], train_config: Mapping[str, Any]) -> str:
    """Key of a cached training run: dataset name, input files' sha256, training config."""
    payload = json.dumps(
        {"dataset": dataset, "sources": dict(sorted(sources.items())), "train": train_config},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_or_reuse(opts: DemoOptions) -> tuple[Path, dict[str, dict[str, float]], bool, float]:
    """Train with the offline protocol, or reuse the cached run of the same key.

    Returns:
        ``(checkpoint dir, offline per-phase metrics of seed 0, reused, seconds)``.
    """
    from emerg_stream.data import load_dataset
    from emerg_stream.meta.pipeline import QUICK_WARMUP_GRID
    from emerg_stream.meta.reproduce import reproduce
    from emerg_stream.meta.train import TrainConfig

    cfg = replace(TrainConfig(), pretrain_epochs=opts.pretrain_epochs, meta_epochs=opts.meta_epochs)
    ilog = load_dataset(opts.dataset, opts.data_dir)
    described = {**asdict(cfg), "method": METHOD, "seeds": 1, "warmup_grid": "quick"}
    key = cache_key(ilog.name, ilog.sources, described)
    run_dir = opts.work_dir / f"run-{ilog.name}-{key}"
    ck_dir = run_dir / "checkpoints" / f"{METHOD}-seed0"
    results_path = run_dir / "results.json"
    if opts.reuse and results_path.is_file() and (ck_dir / "manifest.json").is_file():
        results = json.loads(results_path.read_text())
        log.info("demo_checkpoint_reused", checkpoint=str(ck_dir))
        return ck_dir, results["methods"][METHOD]["seeds"]["0"], True, 0.0
    results_path.unlink(missing_ok=True)  # a stale table must never pair with a new checkpoint
    t0 = time.perf_counter()
    results = reproduce(
        opts.dataset,
        run_dir,
        methods=(METHOD,),
        seeds=1,
        data_dir=opts.data_dir,
        device=opts.device,
        cfg=cfg,
        progress=opts.progress,
        warmup_grid=QUICK_WARMUP_GRID,
        epoch_grid=QUICK_WARMUP_GRID,
    )
    seconds = round(time.perf_counter() - t0, 1)
    log.info("demo_trained", checkpoint=str(ck_dir), seconds=seconds)
    return ck_dir, results["methods"][METHOD]["seeds"]["0"], False, seconds


def wait_for_group(
    consumer_conf: Mapping[str, str],
    group_id: str,
    end_offsets: Mapping[tuple[str, int], int],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
    alive: Any = None,
) -> float:
    """Wait until ``group_id`` has committed at least ``end_offsets`` (lag 0).

    The ends come from the producer's acknowledgements, so this is exact also on
    brokers whose watermark answers are not (Tansu).

    Args:
        consumer_conf: librdkafka settings.
        group_id: The worker's consumer group.
        end_offsets: ``(topic, partition)`` -> offset the group must reach.
        timeout_s: Longest wait.
        stop: Set to give up early (raises :class:`StoppedError`).
        alive: Optional callable; a falsy answer means the worker died (raises).

    Returns:
        Seconds waited.

    Raises:
        StoppedError: ``stop`` was set.
        TransientError: Not caught up in time, or the worker died; the message gives the
            remaining lag per partition.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    conf = {**consumer_conf, "group.id": group_id, "enable.auto.commit": "false"}
    consumer = Consumer(conf)
    t0 = time.monotonic()
    lag: dict[tuple[str, int], int] = dict(end_offsets)
    try:
        while True:
            try:
                committed = consumer.committed(
                    [TopicPartition(t, p) for t, p in end_offsets], timeout=10
                )
            except KafkaException as exc:
                log.warning("committed_offsets_unavailable", error=str(exc))
                committed = []
            got = {(tp.topic, tp.partition): tp.offset for tp in committed}
            lag = {tp: end - max(got.get(tp, 0), 0) for tp, end in end_offsets.items()}
            lag = {tp: n for tp, n in lag.items() if n > 0}
            if not lag:
                return round(time.monotonic() - t0, 1)
            if stop is not None and stop.is_set():
                raise StoppedError("interrupted while waiting for the worker")
            if alive is not None and not alive():
                raise TransientError(f"the worker exited before catching up; lag {lag}")
            if time.monotonic() - t0 > timeout_s:
                raise TransientError(
                    f"the worker did not catch up within {timeout_s}s; remaining lag "
                    f"(topic, partition): {lag}"
                )
            time.sleep(0.5)
    finally:
        consumer.close()


def count_records(consumer_conf: Mapping[str, str], topic: str) -> int:
    """Records in a topic (read to its end)."""
    from emerg_stream.stream.reader import read_to_end

    return sum(1 for _ in read_to_end(consumer_conf, topic, timeout_s=60))


def read_outcomes(stats_file: Path) -> dict[str, dict[str, int]]:
    """The worker's outcome counts per input role, from its stats file (``{}`` if absent)."""
    try:
        stats = json.loads(stats_file.read_text())
    except (OSError, ValueError) as exc:
        log.warning("worker_stats_unavailable", path=str(stats_file), error=str(exc))
        return {}
    process = stats.get("process", {})
    return {str(role): {str(k): int(v) for k, v in c.items()} for role, c in process.items()}


def _die_with_parent() -> Any:
    """A ``preexec_fn`` making Linux SIGTERM the child when this process dies (else None).

    The worker runs in its own session (a terminal's Ctrl-C reaches only the demo, which
    then stops the worker in order); this makes sure it never outlives a killed demo.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return hook


@contextlib.contextmanager
def worker_process(
    bootstrap: str,
    worker_env: Mapping[str, str],
    checkpoint: Path,
    group_id: str,
    stats_file: Path,
    device: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """``emerg-stream worker`` in a child process; SIGTERM (then SIGKILL) on exit.

    The child gets none of this process's ``EMERG_*`` variables (the demo's broker and
    topics must win over a user's production settings), only ``worker_env`` (the topic
    names); everything else is the worker's default.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMERG_")}
    env.update(worker_env)
    cmd = [
        sys.executable,
        "-m",
        "emerg_stream.cli",
        "--log-level",
        "WARNING",
        "worker",
        "--checkpoint",
        str(checkpoint),
        "--bootstrap",
        bootstrap,
        "--group",
        group_id,
        "--device",
        device,
        "--stats-file",
        str(stats_file),
    ]
    proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent()
    )
    log.info("worker_started", pid=proc.pid, group_id=group_id)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("worker_killed", pid=proc.pid)
                proc.kill()
                proc.wait()
        log.info("worker_stopped", pid=proc.pid, returncode=proc.returncode)


def run_demo(
    opts: DemoOptions,
    stop: threading.Event | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole demo (module docstring); ``stop`` interrupts it cleanly.

    Args:
        opts: What to run.
        stop: Set it (e.g. from a signal handler) to stop: the replay and the wait for
            the worker watch it; other stages end first (each is bounded).
        on_stage: Told ``"train"`` before training and ``"stream"`` once the broker is
            about to start, so a signal handler can interrupt training at once (pure
            torch) but only *request* a stop while Kafka clients run: an exception
            raised inside librdkafka's callbacks or destructors leaves the interpreter in
            a broken state (``SystemError``).

    Raises:
        StoppedError: ``stop`` was set.
        EmergError: A stage failed (the message says which and why).
    """
    from emerg_stream.config import TopicSettings
    from emerg_stream.data import load_dataset
    from emerg_stream.meta.checkpoint import load_checkpoint
    from emerg_stream.serving.stream_eval import evaluate_stream
    from emerg_stream.stream.broker import EmbeddedBroker
    from emerg_stream.stream.replay import replay
    from emerg_stream.stream.topics import ensure_topics, load_topic_specs

    stop = stop or threading.Event()

    def check() -> None:
        if stop.is_set():
            raise StoppedError("interrupted")

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if on_stage is not None:
        on_stage("train")
    ck_dir, offline, reused, train_s = train_or_reuse(opts)
    if on_stage is not None:
        on_stage("stream")
    seconds["train"] = round(time.perf_counter() - t, 1)
    check()
    checkpoint = load_checkpoint(ck_dir)
    result = DemoResult(str(ck_dir), reused, train_s, offline)
    topics = TopicSettings(partitions=opts.partitions)
    worker_env = {f"EMERG_TOPICS__{k.upper()}": v for k, v in topics.names().items()}
    group_id = "emerg-demo-worker"
    stats_file = opts.work_dir / "worker-stats.json"
    stats_file.unlink(missing_ok=True)
    with EmbeddedBroker() as broker:
        conf = {"bootstrap.servers": broker.bootstrap}
        ensure_topics(conf, load_topic_specs(None, topics))
        check()
        with worker_process(
            broker.bootstrap, worker_env, ck_dir, group_id, stats_file, opts.device
        ) as worker:
            t = time.perf_counter()
            counts = replay(
                load_dataset(opts.dataset, opts.data_dir),
                conf,
                topics.items,
                topics.interactions,
                n=checkpoint.meta.n,
                k=checkpoint.meta.k,
                progress=opts.progress,
                stop=stop,
                speed=opts.speed,
            )
            check()
            seconds["replay"] = round(time.perf_counter() - t, 1)
            result.replay = {
                "items": counts.items,
                "interactions": counts.interactions,
                "test_rows_left_out": counts.test_rows_left_out,
            }
            t = time.perf_counter()
            wait_for_group(
                conf,
                group_id,
                counts.end_offsets,
                timeout_s=opts.worker_timeout_s,
                stop=stop,
                alive=lambda: worker.poll() is None,
            )
            seconds["worker_catch_up_after_replay"] = round(time.perf_counter() - t, 1)
        result.outcomes = read_outcomes(stats_file)  # final: written at the worker's close
        check()
        t = time.perf_counter()
        ev = evaluate_stream(
            checkpoint,
            load_dataset(opts.dataset, opts.data_dir),
            conf,
            topics.item_params,
            predictions_topic=topics.predictions,
        )
        ev.offline = offline
        seconds["stream_eval"] = round(time.perf_counter() - t, 1)
        result.stream = ev.to_dict()
        result.dead_letters = count_records(conf, topics.dead_letter)
    result.seconds = seconds
    return result


def report(result: DemoResult) -> str:
    """The demo's printout: both tables, the differences and the counts."""
    from emerg_stream.phases import PHASES
    from emerg_stream.serving.stream_eval import StreamEvaluation, comparison_table
    from emerg_stream.topic_roles import INPUT_ROLES

    ev = StreamEvaluation(**result.stream)
    lines = [comparison_table(ev)]
    r = result.replay
    lines.append(
        f"events in: {r.get('items', 0)} item events, {r.get('interactions', 0)} interactions "
        f"({r.get('test_rows_left_out', 0)} held-out test rows left out)"
    )
    for role in INPUT_ROLES:
        o = result.outcomes.get(role)
        if o:
            lines.append(
                f"worker, {role}: applied {o.get('applied', 0)}, duplicates "
                f"{o.get('duplicate', 0)}, dead-lettered {o.get('dead_lettered', 0)}, "
                f"ignored old items {o.get('ignored_old_item', 0)}"
            )
    if not result.outcomes:
        lines.append("worker outcomes: unavailable (no stats file)")
    lines.append(f"dead-letter topic: {result.dead_letters} records")
    if ev.prequential:
        pre = ", ".join(
            f"{k} {100 * v['auc']:.2f} (n={int(v['n'])})" for k, v in ev.prequential.items()
        )
        lines.append(f"prequential AUC: {pre}")
    cov = ", ".join(f"{p} {ev.coverage[p]['published']}/{ev.n_items}" for p in PHASES)
    lines.append(f"items with params of each phase: {cov}")
    lines.append(
        f"checkpoint {result.checkpoint} ({'reused' if result.reused else 'trained'}, "
        f"model_version {ev.model_version}); seconds: {result.seconds}"
    )
    return "\n".join(lines) + "\n"


def check_options(opts: DemoOptions) -> None:
    """Refuse options that cannot work.

    Raises:
        ConfigError: Non-positive epochs, partitions or timeout.
    """
    if opts.pretrain_epochs < 1 or opts.meta_epochs < 0:
        raise ConfigError("--pretrain-epochs must be >= 1 and --meta-epochs >= 0")
    if opts.partitions < 1 or opts.worker_timeout_s <= 0:
        raise ConfigError("--partitions and --worker-timeout must be positive")
