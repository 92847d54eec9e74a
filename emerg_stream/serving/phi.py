"""φ between the model (torch dicts) and the stream (the two float32 slots), by method.

The one place that maps a method's φ entries (:mod:`emerg_stream.methods`) onto the
stream's slots: an entry of kind ``graph`` travels in ``adjacency`` (``[I, F*F]``), the
``embedding`` entry in ``id_embedding`` (``[I, D]``). A method without a graph has an
empty ``adjacency`` (``[I, 0]``). The worker's handler, its batch session and the ranker
convert here, so none of them names a φ entry.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from emerg_stream.errors import ModelError
from emerg_stream.meta.rows import to_device
from emerg_stream.methods import Method, PhiEntry
from emerg_stream.model.base import Phi
from emerg_stream.stream.handler import ParamsArrays

__all__ = ["arrays_to_phi", "phi_to_arrays"]


def _slot(params: ParamsArrays, entry: PhiEntry) -> npt.NDArray[np.float32]:
    return params.adjacency if entry.kind == "graph" else params.id_embedding


def phi_to_arrays(method: Method, phi: Phi) -> ParamsArrays:
    """φ ``[I, ...]`` (any device) -> host float32 slots.

    Raises:
        ModelError: φ lacks one of the method's entries.
    """
    missing = [e.name for e in method.phi if e.name not in phi]
    if missing:
        raise ModelError(f"φ of method {method.name!r} lacks {missing}")
    n = int(next(iter(phi.values())).shape[0])
    out = {"graph": np.zeros((n, 0), dtype=np.float32)}
    for e in method.phi:
        values = phi[e.name].detach().reshape(n, -1).float().cpu().numpy()
        out[e.kind] = np.ascontiguousarray(values)
    return ParamsArrays(out["graph"], out["embedding"])


def arrays_to_phi(
    method: Method, params: ParamsArrays, n_fields: int, dim: int, device: torch.device | str
) -> Phi:
    """Host float32 slots -> φ ``[I, ...]`` on ``device`` (fresh tensors).

    Raises:
        ModelError: A slot's width does not fit the method's φ for ``F``, ``D``.
    """
    n = len(params)
    phi: Phi = {}
    for e in method.phi:
        shape = e.shape(n_fields, dim)
        values = _slot(params, e)
        if values.shape[1:] != (int(np.prod(shape)),):
            raise ModelError(
                f"{e.name} of method {method.name!r}: {values.shape[1:]} values per item, "
                f"expected {shape}"
            )
        moved = to_device(torch.from_numpy(values), torch.device(device))
        phi[e.name] = moved.reshape(n, *shape).clone()
    return phi
