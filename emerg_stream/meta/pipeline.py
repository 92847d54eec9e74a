"""The offline protocol end to end: split -> encode -> train -> select -> phased evaluation.

Model selection never looks at the real new items' test rows: every choice (epochs of
pretraining and meta-training, the warm-up protocol) is made on *pseudo-new* items, 20%
of the old items held out and split like new items. Each method then uses its chosen
settings, trained on all old items, on the real new items.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import structlog
import torch

from emerg_stream.data.split import Split
from emerg_stream.features import FeatureSpec, encode, item_side_index
from emerg_stream.meta.evaluate import WARM_PHASES, NewItemData, run_phases
from emerg_stream.meta.rows import ItemSet, Rows, item_set_from, rows_for
from emerg_stream.meta.train import TrainConfig, meta_train, pretrain
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.model import ItemModel, ModelConfig, build_model

log = structlog.get_logger(__name__)

METHODS: tuple[str, ...] = ("emerg", "deepfm", "metae")

#: The paper's ablations of EmerG: name -> (model config overrides, train config overrides).
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({}, {}),
    "random-graph": ({"graph_mode": "random"}, {}),
    "shared-graph": ({"graph_mode": "shared"}, {}),
    "no-sparsify": ({"topk_ratio": 1.0}, {}),
    "no-mask": ({"use_mask": False}, {}),
    "no-meta": ({}, {"meta_epochs": 0}),
    "no-inner-update": ({}, {"inner_update": False}),
}


@dataclass
class Prepared:
    """A split encoded for training: old items' rows and the new items' phases."""

    old_items: ItemSet
    old_rows: Rows
    old_timestamps: np.ndarray
    new: NewItemData


def prepare(split: Split, spec: FeatureSpec) -> Prepared:
    """Encode every part of a split with one feature spec."""
    enc_old = encode(spec, split.old)
    old_items, old_idx = item_set_from(enc_old)
    old_rows = Rows(
        tokens=torch.from_numpy(np.ascontiguousarray(enc_old.tokens)),
        weights=torch.from_numpy(np.ascontiguousarray(enc_old.weights)),
        labels=torch.from_numpy(np.asarray(enc_old.labels, dtype=np.float32)),
        item=torch.from_numpy(old_idx.astype(np.int64)),
    )
    enc_a = encode(spec, split.warm_a)
    new_items, _ = item_set_from(enc_a)
    warm = {"warm_a": rows_for(enc_a, new_items)}
    for phase in WARM_PHASES[1:]:
        warm[phase] = rows_for(encode(spec, split.part(phase)), new_items)
    test = rows_for(encode(spec, split.test), new_items)
    return Prepared(
        old_items, old_rows, np.asarray(enc_old.timestamps), NewItemData(new_items, warm, test)
    )


def model_config(method: str, spec: FeatureSpec, **overrides: Any) -> ModelConfig:
    """The model config of a method for a feature spec (paper settings by default)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return ModelConfig(
        kind=method,  # type: ignore[arg-type]
        n_fields=spec.n_fields,
        n_item_fields=spec.n_item_fields,
        side_fields=tuple(item_side_index(spec)),
        vocab_size=spec.total_size,
        **overrides,
    )


@dataclass(frozen=True)
class Protocol:
    """What model selection chose for one method (and what the final runs use)."""

    pretrain_epochs: int
    meta_epochs: int
    warmup: WarmupConfig
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "pretrain_epochs": self.pretrain_epochs,
            "meta_epochs": self.meta_epochs,
            "warmup": asdict(self.warmup),
            "validation": self.validation,
        }


#: The warm-up protocols model selection tries (optimiser, lr, steps).
WARMUP_GRID: tuple[WarmupConfig, ...] = tuple(
    WarmupConfig(steps=s, lr=lr, optimizer=o)  # type: ignore[arg-type]
    for o, lr, s in itertools.chain(
        itertools.product(["sgd"], [0.01, 0.1, 0.5, 1.0], [1, 5, 11]),
        itertools.product(["adam"], [0.001, 0.01, 0.05], [1, 5, 11]),
    )
)


#: A small grid for quick runs (the demo): the settings most often chosen on MovieLens.
QUICK_WARMUP_GRID: tuple[WarmupConfig, ...] = (
    WarmupConfig(steps=1, lr=0.5),
    WarmupConfig(steps=5, lr=0.5),
    WarmupConfig(steps=5, lr=0.1),
    WarmupConfig(steps=5, lr=0.01, optimizer="adam"),
)


def _score(metrics: dict[str, dict[str, float]]) -> float:
    """Selection criterion: mean AUC over the four phases."""
    return float(np.mean([m["auc"] for m in metrics.values()]))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train_model(
    method: str,
    spec: FeatureSpec,
    data: Prepared,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    model_overrides: dict[str, Any] | None = None,
    on_epoch: Callable[[str, int, ItemModel], None] | None = None,
) -> ItemModel:
    """Build, pretrain and (for meta methods) meta-train one model."""
    _seed_all(cfg.seed)
    model = build_model(model_config(method, spec, **(model_overrides or {}))).to(device)

    def hook(stage: str, epoch: int) -> None:
        if on_epoch is not None:
            on_epoch(stage, epoch, model)

    pretrain(
        model, data.old_rows, data.old_items, cfg, device=device, progress=progress, on_epoch=hook
    )
    if method != "deepfm":
        meta_train(
            model,
            data.old_rows,
            data.old_items,
            data.old_timestamps,
            cfg,
            device=device,
            progress=progress,
            on_epoch=hook,
        )
    return model


def select_protocol(
    method: str,
    spec: FeatureSpec,
    val: Prepared,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    model_overrides: dict[str, Any] | None = None,
    grid: Sequence[WarmupConfig] = WARMUP_GRID,
) -> Protocol:
    """Choose epochs and the warm-up protocol on pseudo-new items.

    Pretraining and meta-training run for ``cfg``'s epochs (the maxima); after every
    epoch the pseudo-new items are evaluated with the default warm-up and the weights
    are kept; the best epoch's weights then pick the warm-up protocol from ``grid``.
    """
    default = WarmupConfig()
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -1.0}

    def on_epoch(stage: str, epoch: int, model: ItemModel) -> None:
        metrics, _ = run_phases(model, val.new, default, salt=cfg.seed, device=device)
        score = _score(metrics)
        curve.append({"stage": stage, "epoch": epoch, "score": score})
        log.info(
            "validation_epoch", method=method, stage=stage, epoch=epoch, mean_auc=round(score, 4)
        )
        if score > best["score"]:
            best.update(
                score=score,
                stage=stage,
                epoch=epoch,
                state=copy.deepcopy(model.state_dict()),
            )
        model.train()

    model = train_model(
        method,
        spec,
        val,
        cfg,
        device=device,
        progress=progress,
        model_overrides=model_overrides,
        on_epoch=on_epoch,
    )
    model.load_state_dict(best["state"])
    model.eval()
    pre = cfg.pretrain_epochs if best["stage"] == "meta" else best["epoch"]
    meta = best["epoch"] if best["stage"] == "meta" else 0
    trials = []
    for wcfg in grid:
        metrics, _ = run_phases(model, val.new, wcfg, salt=cfg.seed, device=device)
        trials.append((_score(metrics), wcfg, metrics))
    score, chosen, metrics = max(trials, key=lambda t: t[0])
    log.info(
        "protocol_selected",
        method=method,
        pretrain_epochs=pre,
        meta_epochs=meta,
        warmup=asdict(chosen),
        mean_auc=round(score, 4),
    )
    return Protocol(
        pretrain_epochs=pre,
        meta_epochs=meta,
        warmup=chosen,
        validation={"curve": curve, "metrics": metrics, "score": score},
    )


def final_config(cfg: TrainConfig, protocol: Protocol, seed: int) -> TrainConfig:
    """The training config of a final run: chosen epochs, this seed."""
    return replace(
        cfg, seed=seed, pretrain_epochs=protocol.pretrain_epochs, meta_epochs=protocol.meta_epochs
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return (result, seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
