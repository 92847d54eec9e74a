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

from emerg_stream.ablations import STRUCTURES
from emerg_stream.data.split import HoldoutPick, Split, holdout_validation
from emerg_stream.features import FeatureSpec, encode, item_side_index
from emerg_stream.meta.evaluate import NewItemData, run_phases
from emerg_stream.meta.rows import ItemSet, Rows, item_set_from, rows_for
from emerg_stream.meta.train import TrainConfig, meta_train, pretrain
from emerg_stream.meta.warmup import WarmupConfig
from emerg_stream.methods import METHOD_NAMES, get_method
from emerg_stream.model import ItemModel, ModelConfig, build_model
from emerg_stream.phases import WARM_PHASES, WarmupSchedule

log = structlog.get_logger(__name__)

#: The methods the protocol runs (all registered ones: :mod:`emerg_stream.methods`).
METHODS: tuple[str, ...] = METHOD_NAMES


#: EmerG's structures that model selection chooses from per dataset, on pseudo-new items:
#: the two readings of eq. (9) (the paper's symbols are lost: one self-attention over all
#: (order, field) tokens as in the authors' code, or per field over its own orders), each
#: with and without the FM terms, pairwise and first-order (an extension of the paper:
#: ``ablations.STRUCTURES``). Which predicts new items
#: best depends on the data (docs/RESULTS.md); an ablation that sets ``attention`` or
#: ``fm`` fixes that choice.
READINGS: tuple[dict[str, Any], ...] = tuple(STRUCTURES.values())


def reading_name(overrides: dict[str, Any]) -> str:
    """``joint``, ``joint+fm``, ``field`` or ``field+fm``."""
    return str(overrides["attention"]) + ("+fm" if overrides.get("fm") else "")


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
    warm = {WARM_PHASES[0]: rows_for(enc_a, new_items)}
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
        kind=method,
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


#: The most epochs model selection tries: pretraining, and meta-training (the paper's 11).
#: Every method chose the old limits (2 and 3) on ml-100k and ml-1m-u2999; with 4, the
#: joint-attention EmerG chose 4 on ml-100k's pseudo-new items, and 7-8 on synthetic-pairs'.
MAX_PRETRAIN_EPOCHS = 8
MAX_META_EPOCHS = 11

#: The warm-up protocols model selection tries (optimiser, lr, steps), the same for every
#: method: SGD up to lr 2 (DeepFM chose lr 1.0, the old upper limit, on ml-100k's
#: pseudo-new items) and Adam, 1 to 11 steps per phase.
WARMUP_GRID: tuple[WarmupConfig, ...] = tuple(
    WarmupConfig(steps=s, lr=lr, optimizer=o)  # type: ignore[arg-type]
    for o, lr, s in itertools.chain(
        itertools.product(["sgd"], [0.01, 0.1, 0.5, 1.0, 2.0], [1, 5, 11]),
        itertools.product(["adam"], [0.001, 0.01, 0.05], [1, 5, 11]),
    )
)

#: The warm-up protocols scored after every training epoch to choose the epochs: a few
#: that span the grid (small and large SGD steps, Adam), so that each method's epochs
#: are chosen with a warm-up close to its own best rather than one fixed near no-op.
EPOCH_WARMUP_GRID: tuple[WarmupConfig, ...] = tuple(
    WarmupConfig(steps=s, lr=lr, optimizer=o)  # type: ignore[arg-type]
    for o, lr, s in (
        ("sgd", 0.1, 5),
        ("sgd", 0.1, 11),
        ("sgd", 0.5, 1),
        ("sgd", 1.0, 1),
        ("adam", 0.01, 5),
        ("adam", 0.01, 11),
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
    """Selection criterion: mean AUC over the four phases (-inf if a phase diverged)."""
    score = float(np.mean([m["auc"] for m in metrics.values()]))
    return score if np.isfinite(score) else float("-inf")


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
    if get_method(method).meta_trained:
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


def _evaluate_grid(
    model: ItemModel,
    val: Prepared,
    grid: Sequence[WarmupConfig],
    *,
    salt: int,
    device: torch.device,
) -> tuple[float, WarmupConfig, dict[str, dict[str, float]]]:
    """The best warm-up of ``grid`` for ``model`` on the pseudo-new items: (score, cfg, metrics)."""
    best: tuple[float, WarmupConfig, dict[str, dict[str, float]]] | None = None
    for wcfg in grid:
        metrics, _ = run_phases(model, val.new, wcfg, salt=salt, device=device)
        score = _score(metrics)
        if best is None or score > best[0]:
            best = (score, wcfg, metrics)
    if best is None:
        raise ValueError("the warm-up grid is empty")
    return best


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
    epoch_grid: Sequence[WarmupConfig] | None = None,
) -> Protocol:
    """Choose epochs and the warm-up protocol on pseudo-new items, never on test rows.

    Every method is selected the same way, each with its own best warm-up:

    1. Pretraining runs up to ``cfg.pretrain_epochs``; after every epoch the pseudo-new
       items are scored with each warm-up of ``epoch_grid`` (default: ``grid``) and the
       epoch's score is the best of them. The best epoch's weights are kept.
    2. Meta-learning methods meta-train from those weights up to ``cfg.meta_epochs``,
       scored the same way; "0 meta epochs" (the pretrained weights) competes too.
    3. At the chosen weights the whole ``grid`` picks the warm-up protocol.

    Args:
        method: One of :data:`METHODS`.
        spec: Feature spec of the selection split.
        val: The selection split (old items minus pseudo-new ones; pseudo-new items).
        cfg: Training config; its epochs are the maxima tried.
        device: Where to compute.
        progress: Show progress bars.
        model_overrides: Model config overrides (ablations).
        grid: Warm-up protocols tried at the chosen epochs.
        epoch_grid: Warm-up protocols tried after every epoch.

    Returns:
        The chosen epochs and warm-up, with the validation curve and metrics.
    """
    per_epoch = tuple(epoch_grid) if epoch_grid is not None else tuple(grid)
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {}

    def on_epoch(stage: str, epoch: int, model: ItemModel) -> None:
        score, wcfg, _ = _evaluate_grid(model, val, per_epoch, salt=cfg.seed, device=device)
        curve.append({"stage": stage, "epoch": epoch, "score": score, "warmup": asdict(wcfg)})
        log.info(
            "validation_epoch",
            method=method,
            stage=stage,
            epoch=epoch,
            mean_auc=round(score, 4),
            warmup=f"{wcfg.optimizer} {wcfg.lr} x {wcfg.steps}",
        )
        if stage not in best or score > best[stage]["score"]:
            best[stage] = {
                "score": score,
                "epoch": epoch,
                "state": copy.deepcopy(model.state_dict()),
            }
        model.train()

    _seed_all(cfg.seed)
    model = build_model(model_config(method, spec, **(model_overrides or {}))).to(device)
    pretrain(
        model,
        val.old_rows,
        val.old_items,
        cfg,
        device=device,
        progress=progress,
        on_epoch=lambda stage, epoch: on_epoch(stage, epoch, model),
    )
    if "pretrain" not in best:  # no pretraining epoch: the initial weights
        on_epoch("pretrain", 0, model)
    pre = best["pretrain"]
    model.load_state_dict(pre["state"])
    meta_epochs = 0
    if get_method(method).meta_trained and cfg.meta_epochs > 0:
        best["meta"] = {"score": pre["score"], "epoch": 0, "state": pre["state"]}
        meta_train(
            model,
            val.old_rows,
            val.old_items,
            val.old_timestamps,
            replace(cfg, pretrain_epochs=pre["epoch"]),
            device=device,
            progress=progress,
            on_epoch=lambda stage, epoch: on_epoch(stage, epoch, model),
        )
        meta_epochs = best["meta"]["epoch"]
        model.load_state_dict(best["meta"]["state"])
    model.eval()
    score, chosen, metrics = _evaluate_grid(model, val, grid, salt=cfg.seed, device=device)
    log.info(
        "protocol_selected",
        method=method,
        pretrain_epochs=pre["epoch"],
        meta_epochs=meta_epochs,
        warmup=asdict(chosen),
        mean_auc=round(score, 4),
    )
    return Protocol(
        pretrain_epochs=pre["epoch"],
        meta_epochs=meta_epochs,
        warmup=chosen,
        validation={"curve": curve, "metrics": metrics, "score": score},
    )


def reading_candidates(method: str, model_overrides: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The model overrides that selection tries for ``method``, one per structure.

    For EmerG, every structure of :data:`READINGS` that the overrides leave open (each
    merged into them); other methods, and EmerG with both ``attention`` and ``fm`` fixed,
    have one candidate: the overrides as given.
    """
    base = dict(model_overrides or {})
    open_readings = [r for r in READINGS if all(base.get(k, v) == v for k, v in r.items())]
    if method != "emerg" or len(open_readings) < 2:
        return [base]
    return [{**base, **r} for r in open_readings]


def pick_reading(
    method: str, selected: Sequence[tuple[Protocol, dict[str, Any]]]
) -> tuple[Protocol, dict[str, Any]]:
    """The best of the candidates' selections on pseudo-new items (the first on a tie).

    With several candidates, every one's score goes into
    ``protocol.validation["readings"]``.
    """
    best = selected[0]
    for cand in selected[1:]:
        if cand[0].validation["score"] > best[0].validation["score"]:
            best = cand
    if len(selected) > 1:
        scores = {reading_name(ov): p.validation["score"] for p, ov in selected}
        best[0].validation["readings"] = scores
        log.info("reading_selected", method=method, chosen=reading_name(best[1]), scores=scores)
    return best


def select_reading(
    method: str,
    spec: FeatureSpec,
    val: Prepared,
    cfg: TrainConfig,
    *,
    model_overrides: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[Protocol, dict[str, Any]]:
    """:func:`select_protocol`, with EmerG's reading of eq. (9) chosen too.

    Every candidate of :func:`reading_candidates` goes through the whole selection and
    the best pseudo-new score wins (:func:`pick_reading`).

    Returns:
        The chosen protocol and the model overrides to train the final runs with.
    """
    selected = [
        (select_protocol(method, spec, val, cfg, model_overrides=ov, **kw), ov)
        for ov in reading_candidates(method, model_overrides)
    ]
    return pick_reading(method, selected)


def final_config(cfg: TrainConfig, protocol: Protocol, seed: int) -> TrainConfig:
    """The training config of a final run: chosen epochs, this seed."""
    return replace(
        cfg, seed=seed, pretrain_epochs=protocol.pretrain_epochs, meta_epochs=protocol.meta_epochs
    )


#: Pseudo-new items of model selection: the 20 % least-rated old items. Chosen at random
#: (the rule before), they ranked the two readings of eq. (9) on ml-100k the other way
#: round from the test rows; the least-rated ones are the old items most like new items
#: (docs/RESULTS.md, "The selection split").
SELECTION_HOLDOUT: HoldoutPick = "fewest_rows"


def selection_split(split: Split, pick: HoldoutPick | None = None) -> Split:
    """The validation split every method's selection uses (never reads new items).

    20 % of the old items (seed 0), picked per :data:`SELECTION_HOLDOUT` unless ``pick``
    says otherwise, with at most N - 3K test rows each, as real new items have.
    """
    return holdout_validation(
        split,
        frac=0.2,
        seed=0,
        max_test_rows=split.n - WarmupSchedule(split.k).protocol_rows,
        pick=pick or SELECTION_HOLDOUT,
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return (result, seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
