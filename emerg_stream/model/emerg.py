"""EmerG: item-specific feature graphs + graph message passing + attention over orders."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from emerg_stream.model.base import ItemModel, Phi, Prepared
from emerg_stream.model.config import ModelConfig
from emerg_stream.model.graph import GraphGenerator, refine
from emerg_stream.model.interaction import (
    GraphInteraction,
    JointAttention,
    OrderAttention,
    Predictor,
    fm_term,
)


class EmerG(ItemModel):
    """The EmerG network, composed of named parts.

    ``embedding`` (FeatureEmbedding) -> ``generator`` (GraphGenerator, the hypernetwork)
    -> refinement -> ``interaction`` (GraphInteraction) -> ``attention`` (OrderAttention)
    -> ``predictor`` (Predictor).

    φ_i = {"adj": raw graph A_i ``[F, F]``, "id": ID embedding ``[D]``}.

    Args:
        config: Model shape and ablation switches.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        f, d = config.n_fields, config.dim
        self.generator = GraphGenerator(
            len(config.side_fields) * d, f, config.hyper_hidden, config.hyper_depth
        )
        self.shared_graph = (
            nn.Parameter(torch.randn(f, f) * 0.1) if config.graph_mode == "shared" else None
        )
        self.interaction = GraphInteraction(
            d, config.layers, config.activation, config.activate_last
        )
        self.attention: OrderAttention | JointAttention = (
            OrderAttention(d, config.heads, config.head_dim)
            if config.attention == "field"
            else JointAttention(f, d, config.heads, config.head_dim)
        )
        self.predictor = Predictor(f, d, bias=config.predictor_bias)
        # zero at the start: the model begins as the paper's and pretraining learns it
        self.first_order = nn.Linear(f * d, 1, bias=False) if config.linear else None
        if self.first_order is not None:
            nn.init.zeros_(self.first_order.weight)
        self.id_init = nn.Parameter(torch.zeros(d)) if config.learned_id_init else None

    @property
    def noise_dim(self) -> int:
        """ID-embedding noise, plus the graph's for the random-graph ablation."""
        f = self.config.n_fields
        return self.config.dim + (f * f if self.config.graph_mode == "random" else 0)

    def cold_params(self, tokens: Tensor, weights: Tensor, noise: Tensor) -> Phi:
        """φ⁰ = (generated graph, fresh small random ID embedding); see ItemModel."""
        cfg = self.config
        n, f = tokens.shape[0], cfg.n_fields
        noise = noise.to(tokens.device)
        if cfg.graph_mode == "hyper":
            adj = self.generator(self.side_input(tokens, weights))
        elif cfg.graph_mode == "shared":
            if self.shared_graph is None:
                raise RuntimeError("shared graph missing")
            adj = self.shared_graph.expand(n, f, f)
        else:
            adj = noise[:, cfg.dim :].reshape(n, f, f)
        fresh = noise[:, : cfg.dim] * cfg.id_init_std
        return {"adj": adj, "id": fresh if self.id_init is None else self.id_init + fresh}

    def graphs(self, adj: Tensor) -> Tensor:
        """Refined per-layer graphs ``[I, L, F, F]`` from raw ``[I, F, F]``.

        Without ``refine_graph`` (the authors' code) every layer reads the raw graph.
        """
        cfg = self.config
        if not cfg.refine_graph:
            return adj.unsqueeze(1).repeat(1, cfg.layers, 1, 1)
        return refine(
            adj, cfg.layers, cfg.topk, use_mask=cfg.use_mask, sparsify=cfg.topk_ratio < 1.0
        )

    def orders(
        self, tokens: Tensor, weights: Tensor, phi: Phi, row_index: Tensor | None = None
    ) -> Tensor:
        """Message-passing outputs h^(0)..h^(L), ``[B, L+1, F, D]``."""
        return self._orders(self._side_and_user(tokens, weights), phi, row_index)

    def forward(
        self, tokens: Tensor, weights: Tensor, phi: Phi, row_index: Tensor | None = None
    ) -> Tensor:
        """Logits ``[B]``; see ItemModel.forward."""
        return self.forward_prepared(self.prepare(tokens, weights), phi, row_index)

    def prepare(self, tokens: Tensor, weights: Tensor) -> Prepared:
        """Cache the embeddings of fields 1..F-1; see ItemModel.prepare.

        φ = (graph, ID embedding) replaces field 0's embedding and reaches every
        message and attention term through the graphs, so the embeddings of the other
        fields (a table gather and a weighted token sum, ``[B, F-1, D]``) are all of a
        forward pass that is fixed for given rows and shared parameters. Warm-up
        computes them once per phase instead of once per step. (Caching what those
        fields send, W_l e_s, and their order-0 attention projections as well was
        measured slower: joining the cached part to field 0's costs a copy as large as
        the product it saves; docs/BENCHMARKS.md.)
        """
        return Prepared(tokens, weights, {"e": self._side_and_user(tokens, weights)})

    def forward_prepared(
        self, prepared: Prepared, phi: Phi, row_index: Tensor | None = None
    ) -> Tensor:
        """Logits ``[B]`` of prepared rows, the same function as :meth:`forward`."""
        return self.readout(self._orders(prepared.cache["e"], phi, row_index))

    def readout(self, h: Tensor) -> Tensor:
        """Logits ``[B]`` from the message-passing outputs h^(0)..h^(L) ``[B, L+1, F, D]``.

        Attention, the predictor, and the FM and first-order terms over h^(0) if on.
        """
        out: Tensor = self.predictor(self.attention(h))
        if self.config.fm:
            out = out + fm_term(h[:, 0])
        if self.first_order is not None:
            out = out + self.first_order(h[:, 0].flatten(1)).squeeze(-1)
        return out

    def _side_and_user(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """Embeddings of fields 1..F-1 (everything but the id), ``[B, F-1, D]``."""
        e: Tensor = self.embedding(tokens[:, 1:], weights[:, 1:])
        return e

    def _orders(self, e_rest: Tensor, phi: Phi, row_index: Tensor | None) -> Tensor:
        """h^(0)..h^(L) ``[B, L+1, F, D]`` from fields 1..F-1's embeddings and φ."""
        graphs = self.graphs(phi["adj"])
        id_emb = phi["id"]
        if row_index is not None:
            graphs, id_emb = graphs[row_index], id_emb[row_index]
        e = torch.cat([id_emb.unsqueeze(1), e_rest], dim=1)
        out: Tensor = self.interaction(e, graphs)
        return out
