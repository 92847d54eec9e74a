"""Model hyperparameters: frozen dataclasses that travel inside checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

GraphMode = Literal["hyper", "random", "shared"]
Activation = Literal["identity", "relu", "leaky_relu"]
AttentionMode = Literal["field", "joint"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and ablation switches of an item model (EmerG or a baseline).

    Args:
        kind: The method (a name of :data:`emerg_stream.methods.METHODS`; checked where
            the model is built, :func:`emerg_stream.model.build_model`).
        n_fields: F, number of fields (item fields first, the item id at position 0).
        n_item_fields: Item fields, the item id included.
        side_fields: Positions of the item *side* features (the hypernetwork's input).
        vocab_size: Rows of the shared embedding table (row 0 = padding).
        dim: Embedding size d.
        layers: L, message-passing layers; layer l captures order-(l+1) interactions.
        heads: H, attention heads over the orders.
        head_dim: Size of each attention head.
        hyper_hidden: Hidden width of each of the F row-MLPs of the hypernetwork.
        hyper_depth: Hidden layers of each row-MLP, 1 or 2 (the authors': 2 of width F).
        topk_ratio: Fraction of the F*F graph entries kept by TopK (1.0 = no sparsification).
        use_mask: Keep a pair disconnected at order l-1 disconnected at order l.
        refine_graph: Derive each layer's graph from the raw one as the paper does
            (min-max scaling, TopK, symmetrised powers); False is the authors' code, which
            feeds the raw generated graph to every layer (their refinement is commented
            out), so warm-up's gradient reaches it undamped (measured in
            docs/RESULTS.md).
        graph_mode: ``hyper`` (generated per item), ``random`` (a fixed random graph per
            item) or ``shared`` (one learned graph for all items).
        activation: Activation of the message passing (all three are positively
            homogeneous, so layer l stays a degree-(l+1) form of the embeddings).
        activate_last: Apply the activation on the last layer too (the authors' code
            leaves the last layer linear).
        attention: How orders are combined: ``joint`` (one self-attention over all
            (order, field) tokens, queries and keys from each order's whole F·D vector:
            the authors' code; the default, it won on pseudo-new items, docs/RESULTS.md)
            or ``field`` (per field, over its own orders h_r^(0..L): DESIGN.md's first
            reading).
        fm: Add a factorisation-machine term Σ_{r<s} <e_r, e_s> over the first-order
            embeddings to the logit (an extension of the paper: a direct channel
            between a new item's ID embedding and each user field).
        linear: Add a first-order term Σ_r w_rᵀ e_r over the first-order embeddings to
            the logit (with ``fm``, the whole factorisation machine; an extension of the
            paper: a per-item and per-user bias that warm-up moves through the ID
            embedding, docs/RESULTS.md).
        predictor_bias: EmerG's predictor learns its biases (the contribution gate's and
            the logit's); False is the authors' predictor, which has none (measured in
            docs/RESULTS.md).
        mlp_hidden: Hidden widths of the DeepFM deep part and the MetaE generator.
        id_init_std: Std of the fresh random ID embedding a new item starts with.
        learned_id_init: EmerG: a new item's ID embedding starts at a meta-learned vector
            shared by all new items plus that noise (MAML's learned initialisation for
            φ's ID part; docs/RESULTS.md measures it), instead of the noise around zero.
            Zero at the start; pretraining leaves it, meta-training learns it.
        embed_init_std: Std of the initial embedding table.
    """

    kind: str
    n_fields: int
    n_item_fields: int
    side_fields: tuple[int, ...]
    vocab_size: int
    dim: int = 16
    layers: int = 2
    heads: int = 3
    head_dim: int = 16
    hyper_hidden: int = 32
    hyper_depth: int = 1
    topk_ratio: float = 0.5
    use_mask: bool = True
    refine_graph: bool = True
    graph_mode: GraphMode = "hyper"
    activation: Activation = "relu"
    activate_last: bool = True
    attention: AttentionMode = "joint"
    fm: bool = False
    linear: bool = False
    predictor_bias: bool = True
    mlp_hidden: tuple[int, ...] = (64, 32)
    id_init_std: float = 0.01
    learned_id_init: bool = False
    embed_init_std: float = 0.01

    def __post_init__(self) -> None:
        if self.n_fields < 2 or not 1 <= self.n_item_fields < self.n_fields:
            raise ValueError(f"bad field counts: F={self.n_fields}, item={self.n_item_fields}")
        if any(not 0 < s < self.n_item_fields for s in self.side_fields):
            raise ValueError(
                f"side_fields must be item fields other than the id: {self.side_fields}"
            )
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.layers < 1 or self.heads < 1 or self.dim < 1:
            raise ValueError("layers, heads and dim must be positive")

    @property
    def topk(self) -> int:
        """Number of graph entries TopK keeps."""
        return max(1, round(self.topk_ratio * self.n_fields * self.n_fields))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists) for checkpoints."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)
