"""EmerG's ablations and fixed structures: name -> (model config overrides, train overrides).

Standard library only, so the command line lists them without importing torch. Model
selection (``meta.pipeline.select_reading``) chooses EmerG's structure unless an entry here
fixes ``attention`` or ``fm``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ABLATIONS"]

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
    "joint-fm": ({"attention": "joint", "fm": True}, {}),
    "field-fm": ({"attention": "field", "fm": True}, {}),
}
