"""Checkpoints: weights + the config and feature spec that rebuild the model, verified.

A checkpoint is a directory::

    model.pt        torch.save({"model": state_dict, "config": ..., "feature_spec": ...,
                                "model_version": ..., "meta": ...})
    manifest.json   {"files": {"model.pt": sha256}, "model_version": ...}

It is untrusted input: the manifest's sha256 is checked before anything is loaded, and
``model.pt`` is loaded with ``weights_only=True`` (plain tensors and JSON-like values
only; a pickled object is refused). Its facts besides the weights are one typed
:class:`CheckpointMeta`, parsed and checked by :func:`parse_meta` (on save and on load);
every reader takes them from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from emerg_stream.errors import EmergError, ModelError
from emerg_stream.features import FeatureSpec
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.methods import Method, get_method
from emerg_stream.model import ItemModel, ModelConfig, build_model

MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_version(
    state: dict[str, torch.Tensor], config: dict[str, Any], spec: dict[str, Any]
) -> str:
    """A short content hash of weights, config and feature spec."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


#: What the stream and the offline readers need in a checkpoint's meta (key: meaning).
REQUIRED_META: dict[str, str] = {
    "noise_salt": "the salt of the cold-start noise",
    "warmup": "the warm-up protocol",
    "split": "the split's sizes ({'n': N, 'k': K}; K = rows per warm-up phase)",
}


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint says besides its weights, parsed and checked once.

    Every reader (the worker's handler, the ranker, ``evaluate``, ``evaluate-stream``)
    takes its facts from here; :func:`parse_meta` is the only parser.

    Args:
        method: The registered method (:mod:`emerg_stream.methods`).
        config: The model's config (rebuilds the model).
        feature_spec: ``FeatureSpec.to_dict()`` of the encoder it was trained with.
        model_version: Content hash of weights, config and spec; published params carry it.
        warmup: The warm-up protocol of every phase (offline and in the stream).
        noise_salt: Salt of :func:`~emerg_stream.model.item_noise` (cold start).
        k: Rows per warm-up phase (the split's K).
        n: The split's N (rows above which an item is old); None = the dataset's.
        old_item_ids: Items of the training set (scored with their trained params).
        dataset: The dataset it was trained on, if known.
        seed: The training seed, if known.
        train_config: The training config, as saved (JSON-like).
        extra: Other meta keys, kept as they were.
    """

    method: str
    config: ModelConfig
    feature_spec: dict[str, Any]
    model_version: str
    warmup: WarmupConfig
    noise_salt: int
    k: int
    n: int | None = None
    old_item_ids: tuple[str, ...] = ()
    dataset: str | None = None
    seed: int | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> FeatureSpec:
        """The feature spec, parsed.

        Raises:
            ModelError: It does not parse.
        """
        try:
            return FeatureSpec.from_dict(self.feature_spec)
        except (KeyError, TypeError, ValueError, EmergError) as exc:
            raise ModelError(
                f"checkpoint {self.model_version}: invalid feature spec: {exc}"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        """The ``meta`` entry of ``model.pt`` (inverse of :func:`parse_meta`)."""
        out: dict[str, Any] = {
            **self.extra,
            "method": self.method,
            "noise_salt": self.noise_salt,
            "warmup": asdict(self.warmup),
            "split": {"n": self.n, "k": self.k},
            "old_item_ids": list(self.old_item_ids),
            "train_config": self.train_config,
        }
        if self.dataset is not None:
            out["dataset"] = self.dataset
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def _warmup(raw: Any, where: str) -> WarmupConfig:
    if not isinstance(raw, Mapping):
        raise ModelError(f"{where}: meta 'warmup' is not a mapping (got {raw!r})")
    try:
        kw = dict(raw)
        if "betas" in kw:
            kw["betas"] = tuple(float(b) for b in kw["betas"])
        if "lr_scale" in kw:
            kw["lr_scale"] = tuple((str(k), float(v)) for k, v in kw["lr_scale"])
        return WarmupConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: invalid warm-up protocol in meta: {exc}") from exc


def _optional_int(raw: Any, key: str, where: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ModelError(f"{where}: meta {key!r} must be an integer, got {raw!r}")
    return raw


def parse_meta(
    raw: Any,
    config: ModelConfig,
    feature_spec: Any,
    model_version: str,
    where: str = "checkpoint",
) -> CheckpointMeta:
    """Check a checkpoint's facts and return them typed.

    Args:
        raw: The ``meta`` dict as saved.
        config: The model config saved with it.
        feature_spec: The feature spec saved with it.
        model_version: The content hash saved with it.
        where: Names the checkpoint in errors.

    Raises:
        ModelError: One line naming what is missing or invalid: an unknown method, a
            missing ``noise_salt``/``warmup``/``split``, or a bad value. (The feature
            spec is parsed by :attr:`CheckpointMeta.spec`, where a reader needs it.)
    """
    try:
        method = get_method(config.kind).name
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ModelError(f"{where}: meta is not a mapping (got {type(raw).__name__})")
    missing = [f"{k} ({why})" for k, why in REQUIRED_META.items() if raw.get(k) is None]
    if missing:
        raise ModelError(f"{where}: meta lacks {'; '.join(missing)}")
    if raw.get("method", method) != method:
        raise ModelError(
            f"{where}: meta says method {raw['method']!r} but the model config is {method!r}"
        )
    split = raw["split"]
    if not isinstance(split, Mapping) or "k" not in split:
        raise ModelError(f"{where}: meta 'split' must hold k (got {split!r})")
    k = _optional_int(split["k"], "split.k", where)
    if k is None or k < 1:
        raise ModelError(f"{where}: meta split.k must be a positive integer, got {split['k']!r}")
    if not isinstance(feature_spec, Mapping):
        raise ModelError(f"{where}: feature spec is not a mapping")
    old = raw.get("old_item_ids", [])
    if not isinstance(old, list | tuple):
        raise ModelError(f"{where}: meta 'old_item_ids' must be a list")
    train_config = raw.get("train_config", {})
    known = {"method", "noise_salt", "warmup", "split", "old_item_ids", "dataset", "seed"}
    known.add("train_config")
    dataset = raw.get("dataset")
    return CheckpointMeta(
        method=method,
        config=config,
        feature_spec=dict(feature_spec),
        model_version=str(model_version),
        warmup=_warmup(raw["warmup"], where),
        noise_salt=_optional_int(raw["noise_salt"], "noise_salt", where) or 0,
        k=k,
        n=_optional_int(split.get("n"), "split.n", where),
        old_item_ids=tuple(str(i) for i in old),
        dataset=None if dataset is None else str(dataset),
        seed=_optional_int(raw.get("seed"), "seed", where),
        train_config=dict(train_config) if isinstance(train_config, Mapping) else {},
        extra={k: v for k, v in raw.items() if k not in known},
    )


@dataclass(frozen=True)
class Checkpoint:
    """A trained item model with everything needed to rebuild and use it.

    Args:
        model: The model (eval mode).
        meta: Its facts (method, config, feature spec, version, warm-up, salt, K ...).
    """

    model: ItemModel
    meta: CheckpointMeta

    @property
    def feature_spec(self) -> dict[str, Any]:
        """``FeatureSpec.to_dict()`` of the encoder it was trained with."""
        return self.meta.feature_spec

    @property
    def model_version(self) -> str:
        """Content hash; published params carry it."""
        return self.meta.model_version

    @property
    def method(self) -> Method:
        """Its registered method."""
        return get_method(self.meta.method)


def save_checkpoint(
    path: str | Path,
    model: ItemModel,
    feature_spec: dict[str, Any],
    meta: Mapping[str, Any] | CheckpointMeta,
) -> Checkpoint:
    """Write a checkpoint directory and its sha256 manifest; returns what was saved.

    ``meta`` is checked by :func:`parse_meta` before anything is written (a checkpoint
    the readers would refuse is never saved).

    Raises:
        ModelError: ``meta`` lacks what the readers need or is invalid.
    """
    out = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    version = model_version(state, config, feature_spec)
    raw = meta.to_dict() if isinstance(meta, CheckpointMeta) else meta
    parsed = parse_meta(raw, model.config, feature_spec, version, where=f"checkpoint {out}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": state,
            "config": config,
            "feature_spec": feature_spec,
            "model_version": version,
            "meta": parsed.to_dict(),
        },
        out / MODEL_FILE,
    )
    manifest = {"files": {MODEL_FILE: _sha256(out / MODEL_FILE)}, "model_version": version}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return Checkpoint(model, parsed)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load a checkpoint directory.

    Raises:
        ModelError: Missing files, a sha256 mismatch (tampering), a payload that is not
            plain tensors and JSON values, or weights that do not fit the config.
    """
    root = Path(path)
    file, man = root / MODEL_FILE, root / MANIFEST_FILE
    if not file.is_file() or not man.is_file():
        raise ModelError(f"no checkpoint at {root}: expected {MODEL_FILE} and {MANIFEST_FILE}")
    try:
        manifest = json.loads(man.read_text())
        expected = manifest["files"][MODEL_FILE]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"unreadable checkpoint manifest {man}: {exc}") from exc
    actual = _sha256(file)
    if actual != expected:
        raise ModelError(
            f"checkpoint {file} does not match its manifest (sha256 {actual[:12]}… != "
            f"{str(expected)[:12]}…): refusing a modified checkpoint"
        )
    try:
        payload = torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
        # torch's message runs over many lines and suggests weights_only=False; keep the
        # line that names what was refused (e.g. "Unsupported global: GLOBAL posix.system")
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        what = next((ln for ln in lines if "GLOBAL" in ln), lines[-1] if lines else "")
        raise ModelError(
            f"checkpoint {file} is not a plain weights file (pickled objects are never "
            f"loaded): {what[:300]}"
        ) from exc
    if not isinstance(payload, dict):
        raise ModelError(f"checkpoint {file} holds a {type(payload).__name__}, not a dict")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"checkpoint {file} has no valid model config: {exc}") from exc
    meta = parse_meta(
        payload.get("meta"),
        config,
        payload.get("feature_spec"),
        str(payload.get("model_version", "")),
        where=f"checkpoint {root}",
    )
    try:
        model = build_model(config)
        model.load_state_dict(payload["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(f"checkpoint {file} does not fit the model: {exc}") from exc
    model.to(device).eval()
    return Checkpoint(model, meta)
