"""Refinement and message passing: properties that a wrong equation would break."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emerg_stream.model import ModelConfig, build_model
from emerg_stream.model.graph import GraphGenerator, minmax_norm, refine, topk_sparsify
from emerg_stream.model.interaction import (
    GraphInteraction,
    JointAttention,
    OrderAttention,
    fm_term,
)
from emerg_stream.model.layers import FeatureEmbedding


def _raw(seed: int, b: int, f: int) -> torch.Tensor:
    return torch.randn(b, f, f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000), b=st.integers(1, 4), f=st.integers(2, 9), layers=st.integers(1, 4)
)
def test_refined_graphs_are_symmetric_bounded_with_unit_diagonal(seed, b, f, layers):
    k = f + 1 + (seed % (f * f - f))  # keeps the diagonal (all ones) plus at least the max
    g = refine(_raw(seed, b, f), layers, min(k, f * f))
    assert g.shape == (b, layers, f, f)
    assert torch.allclose(g, g.transpose(-1, -2))
    assert g.min() >= 0 and g.max() <= 1 + 1e-12
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    assert torch.allclose(diag, torch.ones_like(diag))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), f=st.integers(2, 9), frac=st.floats(0.05, 1.0))
def test_topk_keeps_exactly_k_entries_the_largest(seed, f, frac):
    m = minmax_norm(_raw(seed, 3, f))
    k = max(1, int(frac * f * f))
    s = topk_sparsify(m, k)
    kept = (s != 0).flatten(1)
    # the minimum of a min-max scaled matrix is 0, so it may be "kept" as a zero
    assert (kept.sum(1) <= k).all() and (kept.sum(1) >= k - 1).all()
    for i in range(3):
        flat, sflat = m[i].flatten(), s[i].flatten()
        smallest_kept = sflat[sflat != 0].min()
        assert (flat[sflat == 0] <= smallest_kept + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), f=st.integers(3, 9), layers=st.integers(2, 4))
def test_mask_is_monotone_over_orders(seed, f, layers):
    g = refine(_raw(seed, 2, f), layers, k=(f * f) // 3 + f)
    for layer in range(1, layers):
        newly = (g[:, layer] != 0) & (g[:, layer - 1] == 0)
        assert not newly.any(), "a pair disconnected at a lower order got connected"


def test_without_mask_higher_orders_can_connect_more_pairs():
    # A path graph 0-1-2-3: (0,2) is a 2-hop pair, absent at order 1.
    raw = torch.full((1, 4, 4), -1.0, dtype=torch.float64)
    for a, b in [(0, 1), (1, 2), (2, 3)]:
        raw[0, a, b] = raw[0, b, a] = 0.5
    masked = refine(raw, 2, k=10, use_mask=True)
    free = refine(raw, 2, k=10, use_mask=False)
    assert masked[0, 1, 0, 2] == 0
    assert free[0, 1, 0, 2] > 0


def test_second_order_graph_is_normalised_square_of_first():
    raw = _raw(3, 1, 5)
    g = refine(raw, 2, k=25, sparsify=False, use_mask=False)
    a1 = g[0, 0]
    sq = a1 @ a1
    expect = (sq - sq.min()) / (sq.max() - sq.min())
    expect.fill_diagonal_(1.0)
    assert torch.allclose(g[0, 1], expect)


@pytest.mark.parametrize(
    ("activation", "activate_last"),
    [("relu", True), ("identity", True), ("leaky_relu", True), ("leaky_relu", False)],
)
@pytest.mark.parametrize("s", [0.5, 2.0, 3.0])
def test_layer_l_is_an_order_l_plus_1_interaction(activation, activate_last, s):
    """Scaling every field embedding by s scales layer l's output by s**(l+1).

    A residual connection, neighbours sending h^(l-1) instead of h^(0), or a missing
    element-wise product would all break this.
    """
    torch.manual_seed(0)
    layers = 3
    gi = GraphInteraction(
        dim=8, layers=layers, activation=activation, activate_last=activate_last
    ).double()
    e = torch.randn(4, 6, 8, dtype=torch.float64)
    graphs = refine(_raw(1, 4, 6), layers, k=20)
    base = gi(e, graphs)
    scaled = gi(s * e, graphs)
    for layer in range(layers + 1):
        assert torch.allclose(scaled[:, layer], s ** (layer + 1) * base[:, layer], atol=1e-9)


def test_message_passing_uses_the_graph():
    torch.manual_seed(0)
    gi = GraphInteraction(dim=4, layers=1, activation="identity").double()
    e = torch.randn(1, 3, 4, dtype=torch.float64)
    g = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    g[0, 0, 0, 1] = 1.0  # field 0 hears only field 1
    out = gi(e, g)[:, 1]
    w = gi.weights[0].weight
    assert torch.allclose(out[0, 0], e[0, 0] * (w @ e[0, 1]))
    assert torch.allclose(out[0, 2], torch.zeros(4, dtype=torch.float64))


def test_generator_rows_are_independent_mlps():
    gen = GraphGenerator(in_dim=6, n_fields=4, hidden=5)
    z = torch.randn(2, 6)
    out = gen(z)
    r = 2
    expect = torch.relu(z @ gen.w1[r] + gen.b1[r]) @ gen.w2[r] + gen.b2[r]
    assert out.shape == (2, 4, 4)
    assert torch.allclose(out[:, r], expect, atol=1e-6)


def test_a_two_layer_generator_is_the_written_mlp_per_row():
    gen = GraphGenerator(in_dim=6, n_fields=4, hidden=5, depth=2)
    assert gen.wm is not None and gen.bm is not None
    with torch.no_grad():
        gen.bm.normal_()
    z = torch.randn(3, 6)
    out = gen(z)
    for r in range(4):
        h = torch.relu(z @ gen.w1[r] + gen.b1[r])
        h = torch.relu(h @ gen.wm[r] + gen.bm[r])
        assert torch.allclose(out[:, r], h @ gen.w2[r] + gen.b2[r], atol=1e-6)
    with pytest.raises(ValueError, match="1 or 2 hidden layers"):
        GraphGenerator(in_dim=6, n_fields=4, hidden=5, depth=3)


def _attention_as_written(att: OrderAttention, h: torch.Tensor) -> torch.Tensor:
    """DESIGN.md step 5 literally: q, k, v per order and head, softmax, out, mean over orders."""
    b, o, f, _ = h.shape
    x = h.transpose(1, 2)  # [B, F, O, D]
    q, k, v = att.qkv(x).view(b, f, o, 3, att.heads, att.head_dim).unbind(dim=3)
    scores = torch.einsum("bfohe,bfphe->bfhop", q, k) / math.sqrt(att.head_dim)
    mixed = torch.einsum("bfhop,bfphe->bfohe", scores.softmax(dim=-1), v).reshape(b, f, o, -1)
    return att.out(mixed).mean(dim=2)


@pytest.mark.parametrize("form", ["eager", "compiler"])
def test_order_attention_equals_the_written_equation(form, monkeypatch):
    """Both evaluation forms (batched matmuls in eager mode, broadcast sums under
    torch.compile) compute DESIGN.md's attention over orders, in float64."""
    torch.manual_seed(0)
    att = OrderAttention(dim=8, heads=3, head_dim=5).double()
    h = torch.randn(7, 3, 4, 8, dtype=torch.float64)
    if form == "compiler":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.allclose(att(h), _attention_as_written(att, h), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["emerg", "deepfm", "metae"])
def test_prepared_forward_equals_the_plain_forward(kind):
    """prepare() + forward_prepared() (warm-up's path) is forward(), to float64 rounding,
    with φ per item (row_index) and per row, and with gradients to φ alike."""
    torch.manual_seed(0)
    f, t, v = 6, 3, 50
    cfg = ModelConfig(
        kind=kind, n_fields=f, n_item_fields=3, side_fields=(1, 2), vocab_size=v, dim=8
    )
    model = build_model(cfg).double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, v, (40, f, t), generator=g)
    weights = torch.rand(40, f, t, generator=g, dtype=torch.float64)
    item = torch.randint(0, 5, (40,), generator=g)
    phi = model.cold_params(tokens[:5], weights[:5], torch.randn(5, model.noise_dim).double())
    phi = {k: p.detach().requires_grad_(True) for k, p in phi.items()}
    with torch.no_grad():
        prepared = model.prepare(tokens, weights)
    for row_index, phi_in in ((item, phi), (None, {k: p[item] for k, p in phi.items()})):
        plain = model(tokens, weights, phi_in, row_index)
        fast = model.forward_prepared(prepared, phi_in, row_index)
        assert torch.allclose(fast, plain, atol=1e-12, rtol=0)
        g_plain = torch.autograd.grad(plain.sum(), list(phi.values()), retain_graph=True)
        g_fast = torch.autograd.grad(fast.sum(), list(phi.values()))
        for a, b in zip(g_plain, g_fast, strict=True):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_message_passing_has_one_function_in_both_forms(activation, monkeypatch):
    """The broadcast-sum form used under torch.compile is the eager matmul form."""
    torch.manual_seed(0)
    gi = GraphInteraction(dim=8, layers=3, activation=activation).double()
    e = torch.randn(5, 6, 8, dtype=torch.float64)
    graphs = refine(_raw(2, 5, 6), 3, k=20)
    eager = gi(e, graphs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.allclose(gi(e, graphs), eager, atol=1e-12, rtol=0)
    assert not torch.allclose(gi(e, torch.zeros_like(graphs))[:, 1:], eager[:, 1:])


def test_field_embedding_is_the_weighted_sum_of_its_tokens_and_padding_learns_nothing():
    """e[b, f] = Σ_t weights[b, f, t] · table[tokens[b, f, t]], row 0 (padding) included as
    zero, and training never moves row 0."""
    torch.manual_seed(0)
    emb = FeatureEmbedding(vocab_size=30, dim=4, init_std=0.5).double()
    tokens = torch.randint(0, 30, (7, 3, 5))
    tokens[:, :, 3:] = 0  # padding slots
    tokens[0, 0, :] = 0  # a field with no token at all
    weights = torch.rand(7, 3, 5, dtype=torch.float64)
    table = emb.table.weight.detach()
    expected = torch.zeros(7, 3, 4, dtype=torch.float64)
    for b, f, t in itertools.product(range(7), range(3), range(5)):
        expected[b, f] += weights[b, f, t] * table[tokens[b, f, t]]
    out = emb(tokens, weights)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert out[0, 0].abs().max() == 0
    out.square().sum().backward()
    grad = emb.table.weight.grad
    assert grad is not None and grad[0].abs().max() == 0 and grad[1:].abs().max() > 0


def test_field_embedding_gradients_are_those_of_the_written_sum():
    """The hand-written backward (a scatter-add into the tokens' rows) gives the table
    and the token weights the gradients of Σ_t w_t · table[token_t] with padding left
    out, and can be differentiated again."""
    torch.manual_seed(1)
    emb = FeatureEmbedding(vocab_size=12, dim=3, init_std=0.5).double()
    tokens = torch.randint(0, 12, (6, 2, 4))  # repeated tokens within and across bags
    tokens[:, :, 3] = 0
    weights = torch.rand(6, 2, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 2, 3, dtype=torch.float64)
    table = emb.table.weight.detach().clone().requires_grad_(True)
    written = (table[tokens] * (weights * (tokens != 0)).unsqueeze(-1)).sum(2)
    want = torch.autograd.grad((written * target).sum(), [table, weights], create_graph=True)
    out = emb(tokens, weights)
    got = torch.autograd.grad((out * target).sum(), [emb.table.weight, weights], create_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-14)
    # second order: d/d weights of <d table, v> (the weights' own gradient is linear in table)
    v = torch.randn_like(table)
    (h_want,) = torch.autograd.grad((want[0] * v).sum(), weights)
    (h_got,) = torch.autograd.grad((got[0] * v).sum(), weights)
    torch.testing.assert_close(h_got, h_want, rtol=0, atol=1e-14)


def test_the_activation_sits_between_layers_only_when_asked():
    """activate_last=False leaves layer L linear (negative messages pass), layers < L not."""
    torch.manual_seed(0)
    e = torch.randn(3, 5, 8, dtype=torch.float64)
    graphs = refine(_raw(3, 3, 5), 2, k=15)
    lin = GraphInteraction(dim=8, layers=2, activation="identity").double()
    for act, last in (("relu", False), ("leaky_relu", False)):
        gi = GraphInteraction(dim=8, layers=2, activation=act, activate_last=last).double()
        gi.load_state_dict(lin.state_dict())
        out, ref = gi(e, graphs), lin(e, graphs)
        msg1 = graphs[:, 0] @ gi.weights[0](e)
        expect1 = e * (torch.relu(msg1) if act == "relu" else torch.nn.functional.leaky_relu(msg1))
        assert torch.allclose(out[:, 1], expect1)
        msg2 = graphs[:, 1] @ gi.weights[1](e)
        assert torch.allclose(out[:, 2], expect1 * msg2)  # no activation on the last layer
        assert not torch.allclose(out[:, 1], ref[:, 1])


def _joint_as_written(att: JointAttention, h: torch.Tensor) -> torch.Tensor:
    """The authors' attention token by token: (order, field) tokens, q/k from x_o."""
    b, o, f, d = h.shape
    heads, a = att.heads, att.head_dim
    out = torch.zeros(b, f, d, dtype=h.dtype)
    for n in range(b):
        q = {
            (i, r): att.q(h[n, i].reshape(-1)).view(f, heads, a)[r]
            for i in range(o)
            for r in range(f)
        }
        k = {
            (i, r): att.k(h[n, i].reshape(-1)).view(f, heads, a)[r]
            for i in range(o)
            for r in range(f)
        }
        v = {(i, r): att.v(h[n, i, r]).view(heads, a) for i in range(o) for r in range(f)}
        toks = list(q)
        for i, r in toks:
            mixed = []
            for hh in range(heads):
                sc = torch.stack([q[i, r][hh] @ k[t][hh] / math.sqrt(a) for t in toks])
                w = sc.softmax(0)
                mixed.append(sum(w[j] * v[t][hh] for j, t in enumerate(toks)))
            out[n, r] += torch.relu(att.out(torch.cat(mixed)))
    return out


def test_joint_attention_equals_the_written_equation():
    torch.manual_seed(0)
    att = JointAttention(n_fields=4, dim=6, heads=2, head_dim=3).double()
    h = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    assert torch.allclose(att(h), _joint_as_written(att, h), atol=1e-12, rtol=0)


def test_joint_attention_lets_the_id_reach_every_field_per_field_attention_does_not():
    torch.manual_seed(0)
    h = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    bumped = h.clone()
    bumped[:, :, 0] += 1.0  # change field 0 (the ID) in every order
    joint = JointAttention(n_fields=4, dim=6, heads=2, head_dim=3).double()
    field = OrderAttention(dim=6, heads=2, head_dim=3).double()
    assert not torch.allclose(joint(h)[:, 1:], joint(bumped)[:, 1:])
    assert torch.allclose(field(h)[:, 1:], field(bumped)[:, 1:])


def test_fm_term_is_the_sum_over_field_pairs():
    e = torch.randn(3, 5, 4, dtype=torch.float64)
    expect = sum((e[:, r] * e[:, s]).sum(-1) for r, s in itertools.combinations(range(5), 2))
    assert torch.allclose(fm_term(e), expect)


def test_fm_option_adds_the_pair_term_to_the_logit():
    torch.manual_seed(0)
    base = ModelConfig(kind="emerg", n_fields=5, n_item_fields=2, side_fields=(1,), vocab_size=30)
    plain = build_model(base).double()
    with_fm = build_model(
        ModelConfig(**{**base.to_dict(), "fm": True, "side_fields": (1,)})
    ).double()
    with_fm.load_state_dict(plain.state_dict())
    tokens = torch.randint(1, 30, (6, 5, 1))
    weights = torch.ones(6, 5, 1, dtype=torch.float64)
    phi = plain.cold_params(tokens, weights, torch.randn(6, plain.noise_dim).double())
    e = plain.orders(tokens, weights, phi)[:, 0]
    assert torch.allclose(with_fm(tokens, weights, phi) - plain(tokens, weights, phi), fm_term(e))


def test_linear_option_adds_the_first_order_term_and_starts_at_zero():
    torch.manual_seed(0)
    base = ModelConfig(kind="emerg", n_fields=5, n_item_fields=2, side_fields=(1,), vocab_size=30)
    plain = build_model(base).double()
    with_lin = build_model(ModelConfig.from_dict({**base.to_dict(), "linear": True})).double()
    assert with_lin.first_order is not None
    assert with_lin.first_order.weight.abs().max() == 0  # begins as the paper's model
    with_lin.load_state_dict(
        {**plain.state_dict(), "first_order.weight": with_lin.first_order.weight}
    )
    tokens = torch.randint(1, 30, (6, 5, 1))
    weights = torch.ones(6, 5, 1, dtype=torch.float64)
    phi = plain.cold_params(tokens, weights, torch.randn(6, plain.noise_dim).double())
    assert torch.equal(with_lin(tokens, weights, phi), plain(tokens, weights, phi))
    w = torch.randn(1, 5 * base.dim, dtype=torch.float64)
    with torch.no_grad():
        with_lin.first_order.weight.copy_(w)
    e = plain.orders(tokens, weights, phi)[:, 0]  # the first-order embeddings, ID from φ
    expect = (e.flatten(1) * w).sum(-1)
    assert torch.allclose(with_lin(tokens, weights, phi) - plain(tokens, weights, phi), expect)


def test_a_config_written_before_the_first_order_term_loads_without_it():
    base = ModelConfig(kind="emerg", n_fields=5, n_item_fields=2, side_fields=(1,), vocab_size=30)
    old = {k: v for k, v in base.to_dict().items() if k != "linear"}
    cfg = ModelConfig.from_dict(old)
    assert cfg.linear is False
    assert build_model(cfg).first_order is None


def test_a_learned_id_init_shifts_every_new_item_and_meta_training_moves_it():
    """φ⁰'s ID = the shared vector + the item's fresh noise; it starts at zero (the
    plain model's φ⁰) and the meta-loss has a gradient to it."""
    torch.manual_seed(0)
    base = ModelConfig(kind="emerg", n_fields=5, n_item_fields=2, side_fields=(1,), vocab_size=30)
    plain = build_model(base).double()
    learned = build_model(ModelConfig.from_dict({**base.to_dict(), "learned_id_init": True}))
    learned = learned.double()
    assert plain.id_init is None and learned.id_init is not None
    learned.load_state_dict({**plain.state_dict(), "id_init": learned.id_init})
    tokens = torch.randint(1, 30, (6, 5, 1))
    weights = torch.ones(6, 5, 1, dtype=torch.float64)
    noise = torch.randn(6, plain.noise_dim, dtype=torch.float64)
    phi, phi_learned = (
        plain.cold_params(tokens, weights, noise),
        learned.cold_params(tokens, weights, noise),
    )
    assert torch.equal(phi["id"], phi_learned["id"])  # zero at the start
    shift = torch.randn(base.dim, dtype=torch.float64)
    with torch.no_grad():
        learned.id_init.copy_(shift)
    moved = learned.cold_params(tokens, weights, noise)
    assert torch.allclose(moved["id"] - phi["id"], shift.expand(6, -1))
    learned(tokens, weights, moved).sum().backward()
    assert learned.id_init.grad is not None and learned.id_init.grad.abs().max() > 0
    assert any(p is learned.id_init for p in learned.meta_parameters())


def test_a_predictor_without_bias_learns_none_and_is_the_biased_one_at_zero_bias():
    torch.manual_seed(0)
    base = ModelConfig(kind="emerg", n_fields=5, n_item_fields=2, side_fields=(1,), vocab_size=30)
    biased = build_model(base).double()
    plain = build_model(ModelConfig.from_dict({**base.to_dict(), "predictor_bias": False}))
    plain = plain.double()
    names = {n for n, _ in plain.named_parameters()}
    assert "predictor.b" not in names and "predictor.contrib.bias" not in names
    assert {n for n, _ in biased.named_parameters()} - names == {
        "predictor.b",
        "predictor.contrib.bias",
    }
    with torch.no_grad():
        biased.predictor.b.fill_(0.7)
        biased.predictor.contrib.bias.uniform_(-1.0, 1.0)
    state = {k: v for k, v in biased.state_dict().items() if not k.startswith("predictor.")}
    plain.load_state_dict({**plain.state_dict(), **state})
    with torch.no_grad():
        plain.predictor.contrib.weight.copy_(biased.predictor.contrib.weight)
        plain.predictor.w.weight.copy_(biased.predictor.w.weight)
    tokens = torch.randint(1, 30, (6, 5, 1))
    weights = torch.ones(6, 5, 1, dtype=torch.float64)
    phi = plain.cold_params(tokens, weights, torch.randn(6, plain.noise_dim).double())
    h = plain.attention(plain.orders(tokens, weights, phi))
    c = torch.sigmoid(h.flatten(1) @ plain.predictor.contrib.weight.T)  # no b_c, no b
    expect = (c * (h @ plain.predictor.w.weight[0])).sum(1)
    assert torch.allclose(plain.predictor(h), expect)
    assert not torch.allclose(biased.predictor(h), expect)
    with torch.no_grad():
        biased.predictor.b.zero_()
        biased.predictor.contrib.bias.zero_()
    assert torch.allclose(biased.predictor(h), expect)


def test_without_refinement_every_layer_reads_the_raw_graph():
    torch.manual_seed(0)
    base = ModelConfig(kind="emerg", n_fields=5, n_item_fields=2, side_fields=(1,), vocab_size=30)
    raw_cfg = ModelConfig.from_dict({**base.to_dict(), "refine_graph": False})
    model = build_model(raw_cfg).double()
    adj = torch.randn(3, 5, 5, dtype=torch.float64)
    graphs = model.graphs(adj)
    assert graphs.shape == (3, base.layers, 5, 5)
    for layer in range(base.layers):
        assert torch.equal(graphs[:, layer], adj)  # negative entries too: nothing scaled
    refined = build_model(base).double().graphs(adj)
    assert not torch.allclose(refined, graphs)
    assert ModelConfig.from_dict(
        {k: v for k, v in base.to_dict().items() if k != "refine_graph"}
    ).refine_graph
