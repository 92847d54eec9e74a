"""EmerG's ablations and fixed structures: name -> (model config overrides, train overrides).

Standard library only, so the command line lists them without importing torch. Model
selection (``meta.pipeline.select_reading``) chooses EmerG's structure unless an entry here
fixes ``attention`` or ``fm``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ABLATIONS", "STRUCTURES", "with_structure"]

#: EmerG's structures that selection chooses from (``meta.pipeline.READINGS``, in this
#: order: the first wins a tie): the two readings of eq. (9), each without and with the
#: factorisation machine (an extension of the paper: the pairwise FM term and the
#: first-order term, ``fm`` and ``linear``; the first-order term won on pseudo-new items,
#: docs/RESULTS.md). ``reproduce --structure NAME`` fixes one and skips the others'
#: selection.
STRUCTURES: dict[str, dict[str, Any]] = {
    name: {"attention": attention, "fm": fm, "linear": fm}
    for attention in ("joint", "field")
    for fm, name in ((False, attention), (True, f"{attention}+fm"))
}

#: The paper's ablations of EmerG: name -> (model config overrides, train config overrides).
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({}, {}),
    "random-graph": ({"graph_mode": "random"}, {}),
    "shared-graph": ({"graph_mode": "shared"}, {}),
    "no-sparsify": ({"topk_ratio": 1.0}, {}),
    "no-mask": ({"use_mask": False}, {}),
    "no-meta": ({}, {"meta_epochs": 0}),
    "no-inner-update": ({}, {"inner_update": False}),
    # each reading of eq. (9) alone (by default selection chooses one: READINGS)
    "field-attention": ({"attention": "field"}, {}),
    "joint-attention": ({"attention": "joint"}, {}),
    # one structure of READINGS fixed (its selection alone; e.g. the one the others lost to)
    "joint-fm": (dict(STRUCTURES["joint+fm"]), {}),
    "field-fm": (dict(STRUCTURES["field+fm"]), {}),
}


def with_structure(ablation: str, structure: str | None) -> dict[str, Any]:
    """The model overrides of ``ablation`` with EmerG's structure fixed to ``structure``.

    Raises:
        ValueError: An unknown name, or an ablation that fixes another structure.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {sorted(ABLATIONS)}")
    model_ov = dict(ABLATIONS[ablation][0])
    if structure is None:
        return model_ov
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose from {list(STRUCTURES)}")
    fixed = STRUCTURES[structure]
    clash = {k: v for k, v in model_ov.items() if k in fixed and v != fixed[k]}
    if clash:
        raise ValueError(f"ablation {ablation!r} fixes {clash}, structure {structure!r} {fixed}")
    return {**model_ov, **fixed}
