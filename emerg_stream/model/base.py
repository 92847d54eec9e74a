"""The item-model contract shared by EmerG and the baselines.

An item model splits its parameters into shared ones (the module's own parameters, Θ)
and item-specific ones φ_i, which are never module parameters: they are an explicit
``dict[str, Tensor]`` with a leading item axis, passed into :meth:`ItemModel.forward`.
That makes the inner loop of meta-learning and the warm-up of thousands of items one
batched autograd computation over a stacked φ, with no fast-weight bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from emerg_stream.model.config import ModelConfig
from emerg_stream.model.layers import FeatureEmbedding

Phi = dict[str, Tensor]


@dataclass(frozen=True)
class Prepared:
    """Rows made ready for repeated forward passes with changing φ.

    What a model can compute from the rows and its shared parameters alone (never from
    φ) sits in ``cache``; :meth:`ItemModel.forward_prepared` reads it instead of
    recomputing it. Valid while the shared parameters do not change (one warm-up phase).

    Args:
        tokens: ``[B, F, T]``.
        weights: ``[B, F, T]``.
        cache: Model-specific tensors with a leading row axis ``B`` (empty by default).
    """

    tokens: Tensor
    weights: Tensor
    cache: dict[str, Tensor] = field(default_factory=dict)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        out: np.ndarray = x ^ (x >> np.uint64(31))
        return out


def item_noise(item_ids: Sequence[str], size: int, salt: int = 0) -> Tensor:
    """Standard-normal noise that depends on the item id only, never on the batch.

    A new item's fresh ID embedding (and, in the random-graph ablation, its graph) is
    drawn from this, so the same item gets the same φ⁰ offline, in one worker, or in
    another worker after a rebalance.

    Args:
        item_ids: ``[I]`` item ids.
        size: Values per item.
        salt: Changes the stream of values (e.g. the seed of a run).

    Returns:
        ``[I, size]`` float32.
    """
    import hashlib

    seeds = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=8).digest(), "little"
            )
            for i in item_ids
        ),
        dtype=np.uint64,
        count=len(item_ids),
    )
    n = size + (size % 2)
    with np.errstate(over="ignore"):
        ctr = seeds[:, None] + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)[None, :]
    bits = _splitmix(ctr) >> np.uint64(11)
    u = (bits.astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=1)
    return torch.from_numpy(z[:, :size].astype(np.float32))


class ItemModel(nn.Module, ABC):
    """A CTR model whose item-specific parameters φ are an explicit input.

    Args:
        config: The model's shape; saved with its weights.
    """

    @property
    def phi_names(self) -> tuple[str, ...]:
        """Keys of φ, from the method registry (:mod:`emerg_stream.methods`)."""
        from emerg_stream.methods import get_method

        return get_method(self.config.kind).phi_names

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = FeatureEmbedding(config.vocab_size, config.dim, config.embed_init_std)
        self.side_fields: Tensor
        self.register_buffer(
            "side_fields", torch.tensor(config.side_fields, dtype=torch.long), persistent=False
        )

    @property
    def noise_dim(self) -> int:
        """Values of :func:`item_noise` that :meth:`cold_params` reads per item."""
        return self.config.dim

    def side_input(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """z: the concatenated item side-feature embeddings (never the id's).

        Args:
            tokens: ``[I, F, T]`` (only the side fields are read).
            weights: ``[I, F, T]``.

        Returns:
            ``[I, n_side * D]``.
        """
        e: Tensor = self.embedding(tokens[:, self.side_fields], weights[:, self.side_fields])
        return e.flatten(1)

    def trained_params(self, tokens: Tensor, weights: Tensor) -> Phi:
        """φ of items the model was trained on: their ID embedding comes from the table.

        Args:
            tokens: ``[I, F, T]``, any row of each item.
            weights: ``[I, F, T]``.
        """
        phi = self.cold_params(tokens, weights, torch.zeros(tokens.shape[0], self.noise_dim))
        phi["id"] = self.embedding.table(tokens[:, 0, 0])
        return phi

    def embed_with_id(self, tokens: Tensor, weights: Tensor, id_emb: Tensor) -> Tensor:
        """Field embeddings ``[B, F, D]`` with field 0 replaced by the item's φ id embedding."""
        e: Tensor = self.embedding(tokens[:, 1:], weights[:, 1:])
        return torch.cat([id_emb.unsqueeze(1), e], dim=1)

    @abstractmethod
    def cold_params(self, tokens: Tensor, weights: Tensor, noise: Tensor) -> Phi:
        """φ⁰ of new items: what an item gets before any click.

        Args:
            tokens: ``[I, F, T]``, any row of each item (only item fields are read).
            weights: ``[I, F, T]``.
            noise: ``[I, noise_dim]`` from :func:`item_noise`.

        Returns:
            φ⁰ with a leading item axis ``I``.
        """

    @abstractmethod
    def forward(
        self, tokens: Tensor, weights: Tensor, phi: Phi, row_index: Tensor | None = None
    ) -> Tensor:
        """Logits of the rows.

        Args:
            tokens: ``[B, F, T]``.
            weights: ``[B, F, T]``.
            phi: Item-specific parameters, ``[I, ...]`` each.
            row_index: ``[B]`` item of each row in ``phi``; ``None`` means one φ per row.

        Returns:
            ``[B]`` logits.
        """

    def prepare(self, tokens: Tensor, weights: Tensor) -> Prepared:
        """The φ-independent part of a forward pass over these rows, computed once.

        The default caches nothing; models override it together with
        :meth:`forward_prepared`. Call it under ``torch.no_grad()`` when no gradient to
        the shared parameters is wanted (warm-up).

        Args:
            tokens: ``[B, F, T]``.
            weights: ``[B, F, T]``.
        """
        return Prepared(tokens, weights)

    def forward_prepared(
        self, prepared: Prepared, phi: Phi, row_index: Tensor | None = None
    ) -> Tensor:
        """Logits ``[B]`` of prepared rows; equal to :meth:`forward` on the same rows.

        Args:
            prepared: From :meth:`prepare` with the current shared parameters.
            phi: Item-specific parameters, ``[I, ...]`` each.
            row_index: ``[B]`` item of each row in ``phi``; ``None`` means one φ per row.
        """
        out: Tensor = self(prepared.tokens, prepared.weights, phi, row_index)
        return out

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters that meta-training updates (all shared ones by default)."""
        return list(self.parameters())


def gather_rows(phi: Phi, row_index: Tensor | None) -> Phi:
    """Expand per-item φ to per-row φ (identity when ``row_index`` is None)."""
    if row_index is None:
        return phi
    return {k: v[row_index] for k, v in phi.items()}
