"""``emerg-stream report``: an HTML page with the plots of a reproduce run.

Per-phase AUC/F1 per method (error bars over seeds), feature-graph heatmaps of sample
new items before and after warm-up, and optionally the prequential AUC over stream time
from a predictions file (``--stream-predictions``; format in
``emerg_stream/report/predictions.py``) or read straight from the predictions topic
(``--predictions-topic``, which also saves the file as ``RUN/stream-predictions.jsonl``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write RUN/report.html: per-phase metrics, graph heatmaps, prequential AUC"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="a reproduce run directory")
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--stream-predictions",
        type=Path,
        default=None,
        metavar="FILE",
        help="CSV or JSON Lines of (event_time ms, label, score[, event_id, phase]) rows",
    )
    src.add_argument(
        "--predictions-topic",
        action="store_true",
        help="read the predictions topic (EMERG_TOPICS__PREDICTIONS on EMERG_KAFKA__*) "
        "into RUN/stream-predictions.jsonl and use it",
    )
    parser.add_argument("--method", default="emerg", help="whose feature graphs to draw")
    parser.add_argument(
        "--item", action="append", default=None, help="draw this item (repeatable; default: 3)"
    )
    parser.add_argument("--bootstrap", default=None, help="with --predictions-topic: brokers")
    parser.add_argument("--timeout", type=float, default=120.0, help="topic read deadline, s")


def run(args: argparse.Namespace) -> int:
    from emerg_stream.report import load_results, write_report

    load_results(args.run)  # fail fast, before reading a topic
    predictions = args.stream_predictions
    if args.predictions_topic:
        predictions = dump_predictions(args.run / "stream-predictions.jsonl", args)
    report = write_report(
        args.run, stream_predictions=predictions, method=args.method, items=args.item
    )
    print(report.html)
    for note in report.notes:
        print(f"left out: {note}")
    return 0


def dump_predictions(out: Path, args: argparse.Namespace) -> Path:
    """Decode the whole predictions topic into a JSON Lines file; return its path."""
    import json

    import structlog

    from emerg_stream.config import Settings, load_settings
    from emerg_stream.errors import SchemaError
    from emerg_stream.io.avro import AvroSerde
    from emerg_stream.io.records import Prediction
    from emerg_stream.stream.reader import read_to_end

    overrides = {"kafka": {"bootstrap_servers": args.bootstrap}} if args.bootstrap else None
    settings = load_settings(Settings, overrides)
    topic = settings.topics.predictions
    serde = AvroSerde(Prediction, topic=topic)
    written = undecodable = 0
    tmp = out.with_suffix(".jsonl.partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for msg in read_to_end(settings.kafka.as_librdkafka(), topic, timeout_s=args.timeout):
            value = msg.value()
            if value is None:
                continue
            try:
                rec = serde.decode(value)
            except SchemaError:
                undecodable += 1
                continue
            fh.write(json.dumps(dict(rec)) + "\n")
            written += 1
    tmp.replace(out)
    structlog.get_logger("jobs.report").info(
        "predictions_dumped", topic=topic, path=str(out), rows=written, undecodable=undecodable
    )
    return out
