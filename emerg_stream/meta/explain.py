"""Heatmaps of an item's feature graphs before and after each warm-up phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emerg_stream.errors import ConfigError
from emerg_stream.meta.checkpoint import load_checkpoint
from emerg_stream.model.emerg import EmerG
from emerg_stream.phases import PHASE_TITLES, PHASES


def item_graphs(
    run: Path, item: str, method: str = "emerg"
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Refined graphs ``[L, F, F]`` of one item per phase, and the field names."""
    npz_path = run / f"phis-{method}.npz"
    if not npz_path.is_file():
        raise ConfigError(
            f"{npz_path} not found: run `emerg-stream reproduce --methods {method}` first"
        )
    data = np.load(npz_path, allow_pickle=False)
    ids = [str(i) for i in data["item_ids"]]
    if item not in ids:
        sample = ", ".join(ids[:5])
        raise ConfigError(f"item {item!r} is not a new item of this run (e.g. {sample})")
    i = ids.index(item)
    ck = load_checkpoint(run / "checkpoints" / f"{method}-seed0")
    if not isinstance(ck.model, EmerG):
        raise ConfigError(f"method {method!r} has no feature graph; use --method emerg")
    names = [str(f["name"]) for f in ck.feature_spec["fields"]]
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for phase in PHASES:
            adj = torch.from_numpy(data[f"{phase}.adj"][i : i + 1])
            out[phase] = ck.model.graphs(adj)[0].numpy()
    return names, out


def render_item_graphs(run: Path, item: str, out: Path, method: str = "emerg") -> Path:
    """Draw one row per phase and one column per order (Â_1 .. Â_L) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, graphs = item_graphs(run, item, method)
    layers = next(iter(graphs.values())).shape[0]
    fig, axes = plt.subplots(
        len(PHASES), layers, figsize=(3.4 * layers + 1, 3.2 * len(PHASES)), squeeze=False
    )
    for r, phase in enumerate(PHASES):
        for c in range(layers):
            ax = axes[r][c]
            im = ax.imshow(graphs[phase][c], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"{PHASE_TITLES[phase]}: order {c + 2} (Â_{c + 1})", fontsize=9)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="edge weight")
    fig.suptitle(f"item {item}: feature graphs of {method}", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
