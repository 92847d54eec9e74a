"""Checkpoints: weights + the config and feature spec that rebuild the model, verified.

A checkpoint is a directory::

    model.pt        torch.save({"model": state_dict, "config": ..., "feature_spec": ...,
                                "model_version": ..., "meta": ...})
    manifest.json   {"files": {"model.pt": sha256}, "model_version": ...}

It is untrusted input: the manifest's sha256 is checked before anything is loaded, and
``model.pt`` is loaded with ``weights_only=True`` (plain tensors and JSON-like values
only; a pickled object is refused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emerg_stream.errors import ModelError
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


@dataclass
class Checkpoint:
    """A trained item model with everything needed to rebuild and use it.

    Args:
        model: The model (eval mode).
        feature_spec: ``FeatureSpec.to_dict()`` of the encoder it was trained with.
        model_version: Content hash; published params carry it.
        meta: Free JSON-like facts (dataset, seed, warm-up protocol, old item ids ...).
    """

    model: ItemModel
    feature_spec: dict[str, Any]
    model_version: str
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path, model: ItemModel, feature_spec: dict[str, Any], meta: dict[str, Any]
) -> Checkpoint:
    """Write a checkpoint directory and its sha256 manifest; returns what was saved."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    version = model_version(state, config, feature_spec)
    torch.save(
        {
            "model": state,
            "config": config,
            "feature_spec": feature_spec,
            "model_version": version,
            "meta": meta,
        },
        out / MODEL_FILE,
    )
    manifest = {"files": {MODEL_FILE: _sha256(out / MODEL_FILE)}, "model_version": version}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return Checkpoint(model, feature_spec, version, meta)


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
    try:
        config = ModelConfig.from_dict(payload["config"])
        model = build_model(config)
        model.load_state_dict(payload["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(f"checkpoint {file} does not fit the model: {exc}") from exc
    model.to(device).eval()
    return Checkpoint(model, payload["feature_spec"], payload["model_version"], payload["meta"])
