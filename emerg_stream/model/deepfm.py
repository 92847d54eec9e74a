"""Baselines on a DeepFM backbone: plain DeepFM and MetaE (meta-learned ID embeddings)."""

from __future__ import annotations

from torch import Tensor, nn

from emerg_stream.model.base import ItemModel, Phi, gather_rows
from emerg_stream.model.config import ModelConfig
from emerg_stream.model.layers import MLP


class DeepFM(ItemModel):
    """DeepFM whose only item-specific parameter is the item's ID embedding.

    logit = linear(concat e) + FM(e) + MLP(concat e), FM(e) = ½ Σ_d [(Σ_j e_j)² − Σ_j e_j²].

    A new item starts from a small random vector (the warm-up protocol of the paper's
    Group A); :class:`MetaE` generates it instead.

    Args:
        config: Model shape.
    """

    #: Whether a generator maps the item side features to a new item's ID embedding.
    generates_id = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        width = config.n_fields * config.dim
        self.linear = nn.Linear(width, 1)
        self.deep = MLP(width, config.mlp_hidden, 1)
        self.id_generator = (
            MLP(len(config.side_fields) * config.dim, config.mlp_hidden[-1:], config.dim)
            if self.generates_id
            else None
        )

    def cold_params(self, tokens: Tensor, weights: Tensor, noise: Tensor) -> Phi:
        """φ⁰ = {"id": generated (MetaE) or small random (DeepFM) ``[I, D]``}."""
        if self.id_generator is not None:
            gen: Tensor = self.id_generator(self.side_input(tokens, weights))
            return {"id": gen}
        return {"id": noise.to(tokens.device)[:, : self.config.dim] * self.config.id_init_std}

    def forward(
        self, tokens: Tensor, weights: Tensor, phi: Phi, row_index: Tensor | None = None
    ) -> Tensor:
        """Logits ``[B]``; see ItemModel.forward."""
        e = self.embed_with_id(tokens, weights, gather_rows(phi, row_index)["id"])
        flat = e.flatten(1)
        fm = 0.5 * (e.sum(dim=1).pow(2) - e.pow(2).sum(dim=1)).sum(dim=1)
        out: Tensor = (self.linear(flat) + self.deep(flat)).squeeze(-1) + fm
        return out

    def meta_parameters(self) -> list[nn.Parameter]:
        """MetaE trains only its generator; the backbone stays as pretrained."""
        if self.id_generator is None:
            return []
        return list(self.id_generator.parameters())


class MetaE(DeepFM):
    """MetaE: DeepFM whose new items' ID embeddings come from a meta-learned generator.

    The generator maps the item side features to the initial ID embedding (the paper's
    Group D); meta-training trains only the generator.

    Args:
        config: Model shape.
    """

    generates_id = True
