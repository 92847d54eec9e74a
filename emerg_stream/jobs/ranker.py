"""``emerg-stream ranker``: an example ranker; scores one user against items with live params.

Reads the item-params topic (and the items topic, for side features) from the beginning
with :class:`~emerg_stream.serving.ranker.RankerClient`, then prints one line per item:
its score, and which params produced it (published version and phase, ``trained`` for an
old item, ``cold-start`` for an unknown item with side features). Cluster and topics come
from the settings (``EMERG_KAFKA__*``, ``EMERG_TOPICS__*``).

Example::

    emerg-stream ranker --checkpoint .cache/demo/run/checkpoints/emerg-seed0 \\
        --item 1682 --item 50 --user-json '{"user_id": "7", "gender": "M", "age": "57"}'
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Example ranker: score a user against items with the latest published item params."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--item", action="append", required=True, help="item id (repeatable)")
    parser.add_argument(
        "--user-json", required=True, help="user features as a flat JSON object (column: value)"
    )
    parser.add_argument(
        "--item-json",
        default=None,
        help="side features of the items as a JSON object (default: from the items topic)",
    )
    parser.add_argument("--bootstrap", default=None, help="bootstrap servers (overrides settings)")
    parser.add_argument("--timeout", type=float, default=60.0, help="catch-up deadline, s")


def _json_object(text: str, flag: str) -> dict[str, object]:
    import json

    from emerg_stream.errors import ConfigError

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def run(args: argparse.Namespace) -> int:
    from emerg_stream.config import Settings, load_settings
    from emerg_stream.serving.ranker import RankerClient

    user = _json_object(args.user_json, "--user-json")
    item_feats = _json_object(args.item_json, "--item-json") if args.item_json else None
    overrides = {"kafka": {"bootstrap_servers": args.bootstrap}} if args.bootstrap else None
    settings = load_settings(Settings, overrides)
    with RankerClient(
        args.checkpoint,
        settings.kafka,
        settings.topics.item_params,
        items_topic=settings.topics.items,
    ) as ranker:
        ranker.catch_up(timeout_s=args.timeout)
        features = [item_feats] * len(args.item) if item_feats is not None else None
        scores = ranker.score([user], args.item, item_features=features)
        print(f"model_version {ranker.model_version}; params held for {len(ranker)} items")
        for item, score in zip(args.item, scores, strict=True):
            version = ranker.version(item)
            if version is not None:
                source = f"v{version} {ranker.phase(item)}"
            elif item in ranker.old_items:
                source = "trained"
            else:
                source = "cold-start"
            print(f"{item}\t{score:.4f}\t{source}")
    return 0
