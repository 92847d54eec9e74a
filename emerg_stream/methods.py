"""The method registry: every method the project trains, evaluates and streams, once.

A :class:`Method` owns what differs between methods: its model class, the names and
shapes of its item-specific parameters φ, whether meta-training runs after pretraining,
and one line each on its cold start and its warm-up. Everything that lists methods
derives from :data:`METHODS`: ``build_model``, the CLI's ``--method``/``--methods``
choices, the offline pipeline, the checkpoint reader, the worker's handler and the
ranker. ``tests/unit/test_methods.py`` fails when a list of method names is written out
by hand again.

This module imports neither torch nor the stream: the CLI builds its parsers from it
and the stream reads φ layouts from it. The model class is named by its import path and
imported on first use (:meth:`Method.model_class`).

How φ travels in the stream: each φ entry has a *kind* that fixes its shape and the
slot of the stream's records (``ItemParams``, ``ItemState``) it travels in —

* ``graph``: ``[F, F]`` per item, the ``adjacency`` slot (row-major ``F*F`` values);
* ``embedding``: ``[D]`` per item, the ``id_embedding`` slot.

A method without a graph publishes an empty ``adjacency`` (``n_fields = 0``).

To add a method: write its model class (an ``ItemModel``), add one :class:`Method` to
:data:`METHODS`; nothing else lists methods.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from emerg_stream.errors import ModelError

if TYPE_CHECKING:
    from emerg_stream.model.base import ItemModel

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "Method",
    "PhiEntry",
    "PhiLayout",
    "get_method",
]

PhiKind = Literal["graph", "embedding"]


@dataclass(frozen=True, slots=True)
class PhiEntry:
    """One item-specific parameter of a method.

    Args:
        name: Its key in the model's φ dict (e.g. ``adj``, ``id``).
        kind: ``graph`` (``[F, F]``, the ``adjacency`` slot) or ``embedding`` (``[D]``,
            the ``id_embedding`` slot).
    """

    name: str
    kind: PhiKind

    def shape(self, n_fields: int, dim: int) -> tuple[int, ...]:
        """Its shape per item: ``(F, F)`` or ``(D,)``."""
        return (n_fields, n_fields) if self.kind == "graph" else (dim,)


@dataclass(frozen=True, slots=True)
class PhiLayout:
    """How one checkpoint's φ travels in the stream (numpy sizes, no torch).

    Args:
        method: The method's name (published with every ItemParams record).
        graph_fields: G, the side of the ``adjacency`` slot (F, or 0 without a graph).
        dim: D, values of the ``id_embedding`` slot.
    """

    method: str
    graph_fields: int
    dim: int

    @property
    def adjacency_size(self) -> int:
        """Values per item in the ``adjacency`` slot (G*G)."""
        return self.graph_fields * self.graph_fields

    def fits(self, adjacency_size: int, id_embedding_size: int) -> bool:
        """Whether stored φ of these sizes belongs to this layout."""
        return adjacency_size == self.adjacency_size and id_embedding_size == self.dim


@dataclass(frozen=True, slots=True)
class Method:
    """A method: its model class, its φ, and how it trains, starts and warms up.

    Args:
        name: The method's name (``--method``, ``ModelConfig.kind``, checkpoints).
        model: Import path of its ``ItemModel`` class, ``module:Class``.
        phi: Its item-specific parameters, in the order the model returns them; exactly
            one ``embedding`` (the item's ID embedding) and at most one ``graph``.
        meta_trained: Whether meta-training follows pretraining.
        cold_start: How a new item's φ⁰ is made (one line, for docs and ``--help``).
        warmup: What the warm-up adapts (one line).
    """

    name: str
    model: str
    phi: tuple[PhiEntry, ...]
    meta_trained: bool
    cold_start: str
    warmup: str

    def __post_init__(self) -> None:
        kinds = [e.kind for e in self.phi]
        if kinds.count("embedding") != 1 or kinds.count("graph") > 1:
            raise ValueError(
                f"method {self.name!r}: φ needs one embedding and at most one graph, got {kinds}"
            )

    @property
    def phi_names(self) -> tuple[str, ...]:
        """Keys of its φ dict."""
        return tuple(e.name for e in self.phi)

    def entry(self, kind: PhiKind) -> PhiEntry | None:
        """Its φ entry of ``kind`` (None if it has none)."""
        return next((e for e in self.phi if e.kind == kind), None)

    @property
    def has_graph(self) -> bool:
        """Whether its φ holds an item graph."""
        return self.entry("graph") is not None

    def layout(self, n_fields: int, dim: int) -> PhiLayout:
        """Its φ in the stream for a model of ``F = n_fields``, ``D = dim``."""
        return PhiLayout(self.name, n_fields if self.has_graph else 0, dim)

    def model_class(self) -> type[ItemModel]:
        """Its model class (imports torch and the model on first call)."""
        module, _, cls = self.model.partition(":")
        found: type[ItemModel] = getattr(importlib.import_module(module), cls)
        return found


_GRAPH = PhiEntry("adj", "graph")
_ID = PhiEntry("id", "embedding")

#: Every method, by name. The first is the default.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="emerg",
            model="emerg_stream.model.emerg:EmerG",
            phi=(_GRAPH, _ID),
            meta_trained=True,
            cold_start="the hypernetwork's item graph from the side features, a small "
            "random ID embedding",
            warmup="graph and ID embedding",
        ),
        Method(
            name="deepfm",
            model="emerg_stream.model.deepfm:DeepFM",
            phi=(_ID,),
            meta_trained=False,
            cold_start="a small random ID embedding (the paper's Group A)",
            warmup="ID embedding",
        ),
        Method(
            name="metae",
            model="emerg_stream.model.deepfm:MetaE",
            phi=(_ID,),
            meta_trained=True,
            cold_start="the ID embedding a meta-learned generator makes from the side "
            "features (Group D)",
            warmup="ID embedding",
        ),
    )
}

#: The names, in registry order (CLI choices, the pipeline's default methods).
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        ModelError: No such method, in one line naming the known ones.
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ModelError(
            f"unknown method {name!r}; this build knows {', '.join(METHODS)}"
        ) from None
