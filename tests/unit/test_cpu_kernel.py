"""The compiled CPU kernel computes autograd's derivatives, and degrades cleanly.

Warm-up's φ-gradient; meta-training's full gradient (to every input and shared weight)
and exact Hessian-vector product, and the meta-gradient built from them.

Each model shape compiles its own library (a second or two, cached under
``EMERG_KERNEL_CACHE``); the shapes below are chosen to cover every compile-time switch
(activation, layers, heads, fields, embedding size, float32/float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from emerg_stream.meta.kernel import (
    KernelRows,
    KernelUnavailableError,
    emerg_kernel,
    row_loss,
    support_grad,
    weight_tensors,
)
from emerg_stream.meta.kernel import library as cpu_kernel
from emerg_stream.meta.rows import ItemSet, Rows
from emerg_stream.meta.train import TrainConfig, meta_loss, meta_train, resolve_meta_backend
from emerg_stream.meta.warmup import WarmupConfig, resolve_backend, warm_up, warm_up_reference
from emerg_stream.model import ModelConfig, build_model, item_noise

CPU = torch.device("cpu")


def _model(dtype: torch.dtype = torch.float64, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    shape: dict[str, object] = dict(
        kind="emerg",
        n_fields=5,
        n_item_fields=3,
        side_fields=(1, 2),
        vocab_size=60,
        attention="field",  # the shapes below name "joint" where they test it
    )
    shape.update(kw)
    model = build_model(ModelConfig(**shape))  # type: ignore[arg-type]
    with torch.no_grad():  # spread the weights so that every term matters
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.to(dtype)


def _rows(model: torch.nn.Module, n_rows: int, n_items: int, seed: int) -> Rows:
    """Rows in shuffled item order, uneven per item, the last item without any."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    f, t = cfg.n_fields, 2
    tokens = torch.randint(1, cfg.vocab_size, (n_rows, f, t), generator=gen)
    weights = torch.rand(n_rows, f, t, generator=gen, dtype=torch.float64)
    labels = (torch.rand(n_rows, generator=gen) < 0.5).double()
    item = torch.randint(0, n_items - 1, (n_rows,), generator=gen)
    dtype = next(model.parameters()).dtype
    return Rows(tokens, weights.to(dtype), labels.to(dtype), item)


def _phi(model: torch.nn.Module, n_items: int) -> dict[str, torch.Tensor]:
    cfg = model.config
    tokens = torch.randint(1, cfg.vocab_size, (n_items, cfg.n_fields, 2))
    weights = torch.ones(n_items, cfg.n_fields, 2)
    noise = item_noise([f"i{i}" for i in range(n_items)], model.noise_dim)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        phi = model.cold_params(tokens, weights.to(dtype), noise.to(dtype))
    phi["id"] = torch.randn(n_items, cfg.dim, dtype=dtype)  # not near zero: every path counts
    return {k: v.detach() for k, v in phi.items()}


def _logits(model, e, graphs):
    """EmerG.forward_prepared's logits from the order-0 embeddings and refined graphs."""
    return model.readout(model.interaction(e, graphs))


def _autograd(model, rows, phi, n_items):
    """Loss and gradients to the refined graphs and the ID embedding, by autograd."""
    graphs = model.graphs(phi["adj"]).detach().requires_grad_(True)
    id_emb = phi["id"].clone().requires_grad_(True)
    e_rest = model.prepare(rows.tokens, rows.weights).cache["e"]
    e = torch.cat([id_emb[rows.item].unsqueeze(1), e_rest], dim=1)
    logits = _logits(model, e, graphs[rows.item])
    losses = F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none")
    counts = torch.bincount(rows.item, minlength=n_items).clamp_min(1).to(losses.dtype)
    inv = (1.0 / counts)[rows.item]
    loss = (losses * inv).sum()
    d_graphs, d_id = torch.autograd.grad(loss, [graphs, id_emb])
    return loss.item(), d_graphs, d_id, e_rest, graphs.detach(), inv


#: Shapes and options that flip every switch of the kernel's source between them.
SHAPES = [
    {},  # relu, L=2, H=3, F=5, D=16, per-field attention
    {"activation": "identity", "layers": 1, "heads": 1, "dim": 4},
    {"layers": 3, "heads": 2, "dim": 8, "n_fields": 7, "n_item_fields": 4, "side_fields": (3,)},
    # the authors' options: LeakyReLU, a linear last layer; the whole FM (pairwise, first order)
    {
        "activation": "leaky_relu",
        "activate_last": False,
        "fm": True,
        "linear": True,
        "layers": 3,
        "dim": 8,
    },
    # joint attention over all (order, field) tokens, head size a != D
    {"attention": "joint", "head_dim": 4},
    {
        "attention": "joint",
        "activation": "leaky_relu",
        "activate_last": False,
        "fm": True,
        "layers": 1,
        "heads": 2,
        "head_dim": 3,
        "dim": 8,
    },
    {
        "attention": "joint",
        "activation": "identity",
        "layers": 3,
        "heads": 1,
        "head_dim": 6,
        "dim": 4,
        "linear": True,  # the first-order term alone
        "n_fields": 7,
        "n_item_fields": 4,
        "side_fields": (3,),
    },
]
SHAPE_IDS = [
    "relu-L2-H3",
    "identity-L1-H1",
    "relu-L3-F7",
    "leaky-linear-last-fm-first-order",
    "joint-relu-L2-H3",
    "joint-leaky-linear-last-fm-L1",
    "joint-identity-L3-F7-first-order",
]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_kernel_gradient_is_autograd_s_in_float64(cxx_compiler, shape):
    """Loss, ∂/∂graphs and ∂/∂id equal autograd's to 1e-12: a wrong term anywhere in the
    hand-written backward (attention, softmax, messages, predictor) shows up here."""
    model = _model(**shape)
    n_items = 6
    rows = _rows(model, 37, n_items, seed=1)  # 37 rows: two full tiles and a partial one
    phi = _phi(model, n_items)
    loss, d_graphs, d_id, e_rest, graphs, inv = _autograd(model, rows, phi, n_items)
    kernel = emerg_kernel(model, torch.float64, CPU)
    k_loss, k_graphs, k_id = kernel(model, e_rest, graphs, phi["id"], rows.item, rows.labels, inv)
    assert abs(k_loss - loss) <= 1e-12 * max(1.0, abs(loss))
    scale = max(d_graphs.abs().max().item(), d_id.abs().max().item())
    assert scale > 1e-3  # the comparison is not between zeros
    assert (k_graphs - d_graphs).abs().max().item() <= 1e-12 * scale
    assert (k_id - d_id).abs().max().item() <= 1e-12 * scale
    assert k_graphs[n_items - 1].abs().max() == 0 and k_id[n_items - 1].abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_the_kernel_logits_are_the_model_s_forward(cxx_compiler, shape, dtype):
    """The scoring entry (the forward alone), the rows embedded in the kernel from their
    tokens: the model's logits to 1e-12 in float64 and float32 rounding in float32."""
    model = _model(dtype, **shape)
    n_items = 6
    rows = _rows(model, 37, n_items, seed=1)
    phi = _phi(model, n_items)
    with torch.no_grad():
        want = model(rows.tokens, rows.weights, phi, rows.item)
    kernel = emerg_kernel(model, dtype, CPU)
    got = kernel.logits(
        model,
        model.graphs(phi["adj"]).detach(),
        phi["id"],
        rows.item,
        tokens=rows.tokens[:, 1:].contiguous(),
        token_weights=rows.weights[:, 1:].contiguous(),
        table=model.embedding.table.weight.detach(),
    )
    assert got.dtype == dtype and got.shape == want.shape
    assert want.std() > 0.05  # rows differ: not a comparison of constants
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()


def test_the_worker_scores_emerg_on_the_kernel_as_torch_does(cxx_compiler, tmp_path):
    """A worker's batch session scores EmerG's rows on the warm-up's kernel: the same
    click probabilities as the model's torch forward (``autograd`` backend), to float32
    rounding, before and after a warm-up phase."""
    import worker_world as ww

    from emerg_stream.serving.handler import TorchWarmupHandler
    from emerg_stream.stream.handler import ItemFeatures

    world = ww.make_world(n_new=3, n_old=1, k=2)
    ck = ww.build_checkpoint(world, tmp_path / "ck")
    # numeric values left out (null: the column's mean): the tiny world's near-constant
    # numeric columns would scale their embeddings by ~1e7 and saturate every score
    items = [
        ItemFeatures(r["item_id"], r["categorical"], r["multi"], {})
        for r in world.items
        if r["item_id"] in world.new_ids
    ][:2]
    rows = [
        {**r, "numeric": {}, "label": int(r["label"])}
        for r in world.interactions
        if r["item_id"] in (items[0].item_id, items[1].item_id)
    ][:5]
    slots = np.array([0 if r["item_id"] == items[0].item_id else 1 for r in rows])
    scores = {}
    for backend in ("kernel", "autograd"):
        handler = TorchWarmupHandler.from_checkpoint(ck, "cpu", warmup_backend=backend)
        cold = handler.cold_start(items)
        session = handler.open_batch(items, cold, np.zeros(2, dtype=np.bool_))
        assert (session._kernel is not None) == (backend == "kernel")
        before = session.score(slots, rows)  # type: ignore[arg-type]
        session.update(np.array([0, 1]), [rows[:2], rows[2:4]])  # type: ignore[list-item]
        scores[backend] = (before, session.score(slots, rows))  # type: ignore[arg-type]
    for got, want in zip(scores["kernel"], scores["autograd"], strict=True):
        assert np.abs(got - want).max() <= 1e-6
    assert np.abs(scores["kernel"][1] - scores["kernel"][0]).max() > 1e-4  # warm-up moved them


#: The authors' options together, on the ML-1M-like head shape (float32 and whole-phase tests).
JOINT_OPTIONS = {"attention": "joint", "activation": "leaky_relu", "activate_last": False}
OPTION_SETS = [{}, JOINT_OPTIONS, {**JOINT_OPTIONS, "fm": True, "linear": True}]
OPTION_IDS = ["field-relu", "joint-leaky-linear-last", "joint-leaky-linear-last-fm-first-order"]


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_the_kernel_gradient_is_autograd_s_in_float32(cxx_compiler, options):
    model = _model(torch.float32, dim=16, heads=3, **options)
    n_items = 5
    rows = _rows(model, 70, n_items, seed=2)
    phi = _phi(model, n_items)
    loss, d_graphs, d_id, e_rest, graphs, inv = _autograd(model, rows, phi, n_items)
    kernel = emerg_kernel(model, torch.float32, CPU)
    k_loss, k_graphs, k_id = kernel(model, e_rest, graphs, phi["id"], rows.item, rows.labels, inv)
    assert k_graphs.dtype == torch.float32
    assert abs(k_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    scale = max(d_graphs.abs().max().item(), d_id.abs().max().item())
    assert (k_graphs - d_graphs).abs().max().item() <= 1e-5 * scale
    assert (k_id - d_id).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("sgd", {}), ("adam", {}), ("sgd", OPTION_SETS[2]), ("adam", OPTION_SETS[2])],
    ids=["sgd", "adam", "sgd-joint-options", "adam-joint-options"],
)
def test_kernel_warm_up_equals_the_per_item_autograd_path(cxx_compiler, optimizer, options):
    """Whole phases: chunks of 4 items, a scaled graph lr, an item without rows."""
    model = _model(**options)
    n_items = 10
    rows = _rows(model, 80, n_items, seed=3)
    phi = _phi(model, n_items)
    cfg = WarmupConfig(steps=4, lr=0.05, optimizer=optimizer, lr_scale=(("adj", 3.0),))
    got = warm_up(model, phi, rows, cfg, chunk=4, backend="kernel")
    ref = warm_up_reference(model, phi, rows, cfg)
    for k in phi:
        assert (got[k] - ref[k]).abs().max() <= 1e-10
        assert (got[k][: n_items - 1] - phi[k][: n_items - 1]).abs().max() > 1e-3
        assert torch.equal(got[k][n_items - 1], phi[k][n_items - 1])


def test_a_diverging_warm_up_is_not_taken_for_out_of_memory(cxx_compiler):
    """A step size that blows φ up gives autograd's non-finite φ, not a MemoryError."""
    model = _model()
    rows = _rows(model, 40, 5, seed=4)
    phi = _phi(model, 5)
    cfg = WarmupConfig(steps=30, lr=1e6)
    got = warm_up(model, phi, rows, cfg, backend="kernel")
    ref = warm_up(model, phi, rows, cfg, backend="autograd")
    assert not torch.isfinite(ref["id"]).all()
    assert not torch.isfinite(got["id"]).all()  # diverged alike (which entry first may differ)


def test_auto_takes_the_kernel_for_emerg_on_the_cpu_only(cxx_compiler):
    emerg = _model(torch.float32)
    assert resolve_backend(emerg, "auto", torch.float32, CPU)[0] == "kernel"
    assert resolve_backend(emerg, "autograd", torch.float32, CPU) == ("autograd", None)
    deepfm = build_model(
        ModelConfig(kind="deepfm", n_fields=5, n_item_fields=3, side_fields=(1, 2), vocab_size=60)
    )
    assert resolve_backend(deepfm, "auto", torch.float32, CPU) == ("autograd", None)
    with pytest.raises(KernelUnavailableError, match="DeepFM"):
        resolve_backend(deepfm, "kernel", torch.float32, CPU)
    with pytest.raises(KernelUnavailableError, match="float32 and float64"):
        resolve_backend(emerg, "kernel", torch.float16, CPU)
    with pytest.raises(ValueError, match="unknown warm-up backend"):
        resolve_backend(emerg, "fast", torch.float32, CPU)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "option",
    [
        {"attention": "joint"},
        {"fm": True},
        {"linear": True},
        {"activate_last": False},
        {"activation": "leaky_relu"},
    ],
)
def test_every_emerg_option_runs_on_the_kernel(cxx_compiler, option):
    model = _model(torch.float32, **option)
    assert resolve_backend(model, "auto", torch.float32, CPU)[0] == "kernel"
    assert resolve_meta_backend(model, "auto", torch.float32, CPU) is not None


needs_bf16_tiles = pytest.mark.skipif(
    not cpu_kernel.cpu_has_bf16_tiles(), reason="this CPU has no AMX-BF16 tile unit"
)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


class _Bf16Product(torch.autograd.Function):
    """x Wᵀ with x and W rounded to bfloat16 and exact sums; backward likewise (the
    gradient rounded): what the kernel's tile products compute, emulated."""

    @staticmethod
    def forward(ctx, x, w):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(w)
        return (_bf16(x) @ _bf16(w).T).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (w,) = ctx.saved_tensors
        return (_bf16(g) @ _bf16(w)).to(g.dtype), None


class _Bf16Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Bf16Product.apply(x, self.linear.weight)  # the maps have no bias


@needs_bf16_tiles
@pytest.mark.parametrize("options", OPTION_SETS[1:], ids=OPTION_IDS[1:])
def test_the_bf16_kernel_is_autograd_with_bf16_query_and_key_maps(cxx_compiler, options):
    """kernel-bf16 equals autograd whose query and key maps round their inputs (and, in
    the backward, their output gradients) to bfloat16: the tile packing, the pairing of
    inputs and the padding are right. Against plain float32 autograd it differs by
    bfloat16's rounding, far more: the tiles really run."""
    model = _model(torch.float32, dim=16, heads=3, **options)
    n_items = 5
    rows = _rows(model, 70, n_items, seed=2)  # four full tiles and a partial one
    phi = _phi(model, n_items)
    kernel = emerg_kernel(model, torch.float32, CPU, bf16=True)
    assert kernel.bf16
    _, d_graphs, d_id, e_rest, graphs, inv = _autograd(model, rows, phi, n_items)
    k_loss, k_graphs, k_id = kernel(model, e_rest, graphs, phi["id"], rows.item, rows.labels, inv)
    attention = model.attention
    plain = attention.q, attention.k
    attention.q, attention.k = (_Bf16Linear(m) for m in plain)
    try:
        loss, e_graphs, e_id, *_ = _autograd(model, rows, phi, n_items)
    finally:
        attention.q, attention.k = plain
    scale = max(d_graphs.abs().max().item(), d_id.abs().max().item())
    assert abs(k_loss - loss) <= 1e-5 * abs(loss)
    # the backward's rounding of a float32 gradient can land on the other side of a
    # bfloat16 rounding boundary than autograd's: up to 3.9e-5 here
    assert (k_graphs - e_graphs).abs().max().item() <= 5e-4 * scale
    assert (k_id - e_id).abs().max().item() <= 5e-4 * scale
    assert (
        max((k_graphs - d_graphs).abs().max().item(), (k_id - d_id).abs().max().item())
        > 2e-3 * scale
    )


@needs_bf16_tiles
def test_a_bf16_warm_up_lands_near_the_float32_one(cxx_compiler):
    """Whole phases at the model's own initialisation (``_model`` spreads the weights so
    far that a phase of steps is chaotic: any rounding grows): kernel-bf16's φ is
    float32's within a small share of the phase's move."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="emerg",
        n_fields=5,
        n_item_fields=3,
        side_fields=(1, 2),
        vocab_size=60,
        dim=16,
        heads=3,
        **OPTION_SETS[2],  # type: ignore[arg-type]
    )
    model = build_model(cfg)
    n_items = 10
    rows = _rows(model, 80, n_items, seed=3)
    phi = _phi(model, n_items)
    warm = WarmupConfig(steps=5, lr=0.1)
    exact = warm_up(model, phi, rows, warm, backend="kernel")
    fast = warm_up(model, phi, rows, warm, backend="kernel-bf16")
    for name in phi:
        moved = (exact[name] - phi[name]).abs().max().item()
        assert moved > 1e-4
        assert (fast[name] - exact[name]).abs().max().item() <= 0.01 * moved


def test_bf16_products_are_refused_where_they_do_not_serve(cxx_compiler):
    """Per-field attention, float64, a head shape off the tiles: a clear refusal (not the
    machine's fault), and ``auto`` never takes them."""
    for model, dtype in [
        (_model(torch.float32, dim=16), torch.float32),
        (_model(torch.float64, dim=16, attention="joint"), torch.float64),
        (_model(torch.float32, dim=8, attention="joint"), torch.float32),
    ]:
        with pytest.raises(KernelUnavailableError, match="bfloat16 products serve") as err:
            resolve_backend(model, "kernel-bf16", dtype, CPU)
        assert not err.value.machine
        assert not resolve_backend(model, "auto", dtype, CPU)[1].bf16


def test_an_activation_the_kernel_does_not_know_runs_on_autograd(cxx_compiler):
    model = _model(torch.float32, activation="tanh")
    assert resolve_backend(model, "auto", torch.float32, CPU) == ("autograd", None)
    assert resolve_meta_backend(model, "auto", torch.float32, CPU) is None
    with pytest.raises(KernelUnavailableError, match="unknown activation") as err:
        resolve_backend(model, "kernel", torch.float32, CPU)
    assert not err.value.machine


def test_without_a_compiler_auto_falls_back_and_kernel_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-cxx-for-emerg")
    monkeypatch.setenv("EMERG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    model = _model(torch.float32)
    assert resolve_backend(model, "auto", torch.float32, CPU) == ("autograd", None)
    with pytest.raises(KernelUnavailableError, match=r"no C\+\+ compiler") as err:
        resolve_backend(model, "kernel", torch.float32, CPU)
    assert err.value.machine
    rows = _rows(model, 20, 3, seed=4)
    phi = _phi(model, 3)
    cfg = WarmupConfig()
    torch.testing.assert_close(  # the fallback is the same update
        warm_up(model, phi, rows, cfg), warm_up(model, phi, rows, cfg, backend="autograd")
    )


def test_a_build_is_cached_and_reused_across_processes(cxx_compiler, monkeypatch, tmp_path):
    """The library lands in EMERG_KERNEL_CACHE; a fresh process (a fresh in-memory
    table here) loads it without compiling again."""
    monkeypatch.setenv("EMERG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    model = _model(dim=4)
    emerg_kernel(model, torch.float64, CPU)
    built = list(tmp_path.glob("emerg_grad-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    monkeypatch.setenv("CXX", "no-such-cxx-for-emerg")  # a rebuild would fail
    with pytest.raises(KernelUnavailableError):  # the compiler is looked up for the cache key
        emerg_kernel(model, torch.float64, CPU)
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    emerg_kernel(model, torch.float64, CPU)
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("emerg_grad-*.so")] == [stamp]


def test_inputs_that_would_read_out_of_bounds_are_refused(cxx_compiler):
    model = _model()
    rows = _rows(model, 10, 3, seed=5)
    phi = _phi(model, 3)
    _, _, _, e_rest, graphs, inv = _autograd(model, rows, phi, 3)
    kernel = emerg_kernel(model, torch.float64, CPU)
    bad = rows.item.clone()
    bad[4] = 3
    with pytest.raises(ValueError, match=r"row items must lie in \[0, 3\)"):
        kernel(model, e_rest, graphs, phi["id"], bad, rows.labels, inv)
    with pytest.raises(ValueError, match="id_emb has shape"):
        kernel(model, e_rest, graphs, phi["id"][:, :-1], rows.item, rows.labels, inv)
    with pytest.raises(ValueError, match="one entry per row"):
        kernel(model, e_rest, graphs, phi["id"], rows.item, rows.labels[:-1], inv)
    krows = cpu_kernel.KernelRows(rows.item, rows.labels, inv, rows.tokens[:, 1:], rows.weights)
    with pytest.raises(ValueError, match="token weights and tokens differ"):
        kernel.phi_grad(model, graphs, phi["id"], krows, table=model.embedding.table.weight)
    with pytest.raises(ValueError, match="without e_rest"):
        kernel.phi_grad(
            model, graphs, phi["id"], cpu_kernel.KernelRows(rows.item, rows.labels, inv)
        )


# ---- meta-training: the full gradient, the Hessian-vector product, the meta-gradient ----


def _inputs(model, rows, phi, n_items):
    """Leaves for every input the kernel differentiates (the embedding table among the
    parameters), the loss written in torch, and the rows with their tokens."""
    graphs = model.graphs(phi["adj"]).detach().requires_grad_(True)
    id_emb = phi["id"].clone().requires_grad_(True)
    counts = torch.bincount(rows.item, minlength=n_items).clamp_min(1).to(graphs.dtype)
    inv = (1.0 / counts)[rows.item]
    e_rest = model.prepare(rows.tokens, rows.weights).cache["e"]
    e = torch.cat([id_emb[rows.item].unsqueeze(1), e_rest], dim=1)
    logits = _logits(model, e, graphs[rows.item])
    losses = F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none")
    loss = (losses * inv).sum()
    leaves = [graphs, id_emb, *model.parameters()]
    krows = KernelRows(rows.item, rows.labels, inv, rows.tokens[:, 1:], rows.weights[:, 1:])
    return loss, leaves, krows


def _assert_close_lists(got, want, tol):
    scale = max(float(w.abs().max()) for w in want if w is not None)
    assert scale > 1e-2  # the comparison is not between zeros
    for g, w in zip(got, want, strict=True):
        if w is None:  # a parameter outside the rows' loss (the generator)
            assert g is None or float(g.abs().max()) == 0
        else:
            assert g is not None and float((g - w).abs().max()) <= tol * scale


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_kernel_full_gradient_is_autograd_s_in_float64(cxx_compiler, shape):
    """∂loss/∂ every input and every shared parameter (through the stacked W_l, the
    folded attention maps, and the table through the tokens the kernel embeds) equal
    autograd's to 1e-12: a missing or wrong weight term (dM, dN, dW_l, the contribution
    and prediction weights, the biases, the table's scatter) shows up here."""
    model = _model(**shape)
    n_items = 6
    rows = _rows(model, 37, n_items, seed=1)
    loss, leaves, krows = _inputs(model, rows, _phi(model, n_items), n_items)
    want = torch.autograd.grad(loss, leaves, allow_unused=True)
    graphs, id_emb = leaves[:2]
    kernel = emerg_kernel(model, torch.float64, CPU)
    got_loss = row_loss(kernel, model, krows, graphs, id_emb, weight_tensors(model))
    assert abs(got_loss.item() - loss.item()) <= 1e-12 * abs(loss.item())
    got = torch.autograd.grad(got_loss, leaves, allow_unused=True)
    _assert_close_lists(got, want, 1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_kernel_hessian_vector_product_is_autograd_s_double_backward(cxx_compiler, shape):
    """The gradient of ⟨∂loss/∂(graphs, id), v⟩ to every input and parameter, from the
    kernel's dual-number pass, equals autograd's double backward to 1e-12 in float64:
    this is the second-order term of meta-training's inner step."""
    model = _model(**shape)
    n_items = 6
    rows = _rows(model, 37, n_items, seed=2)
    loss, leaves, krows = _inputs(model, rows, _phi(model, n_items), n_items)
    graphs, id_emb = leaves[:2]
    gen = torch.Generator().manual_seed(3)
    v_graphs = torch.randn(graphs.shape, generator=gen, dtype=graphs.dtype)
    v_id = torch.randn(id_emb.shape, generator=gen, dtype=id_emb.dtype)
    first = torch.autograd.grad(loss, [graphs, id_emb], create_graph=True)
    want = torch.autograd.grad(
        (first[0] * v_graphs).sum() + (first[1] * v_id).sum(), leaves, allow_unused=True
    )
    kernel = emerg_kernel(model, torch.float64, CPU)
    g_graphs, g_id = support_grad(kernel, model, krows, graphs, id_emb, weight_tensors(model))
    for got_g, want_g in zip((g_graphs, g_id), first, strict=True):  # the first order too
        diff, scale = (got_g - want_g).detach().abs().max(), want_g.detach().abs().max()
        assert float(diff) <= 1e-12 * float(scale)
    got = torch.autograd.grad(
        (g_graphs * v_graphs).sum() + (g_id * v_id).sum(), leaves, allow_unused=True
    )
    _assert_close_lists(got, want, 1e-12)


def _meta_batch(model, n_tasks=5):
    cfg = model.config
    sup, qry = _rows(model, 40, n_tasks, seed=3), _rows(model, 33, n_tasks, seed=4)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, cfg.vocab_size, (n_tasks, cfg.n_fields, 2), generator=gen)
    dtype = next(model.parameters()).dtype
    weights = torch.ones(n_tasks, cfg.n_fields, 2, dtype=dtype)
    noise = torch.randn(n_tasks, model.noise_dim, generator=gen, dtype=dtype)
    return sup, qry, tokens, weights, noise


def _meta_grads(model, batch, cfg, kernel):
    sup, qry, tokens, weights, noise = batch
    model.zero_grad(set_to_none=True)
    phi0 = model.cold_params(tokens, weights, noise)
    loss = meta_loss(model, sup, qry, phi0, len(tokens), cfg, kernel)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize(
    ("variant", "graph_mode", "options"),
    [
        (dict(), "hyper", {}),
        (dict(second_order=False), "hyper", {}),
        (dict(inner_update=False), "hyper", {}),
        (dict(), "shared", {}),
        (dict(), "random", {}),
        (dict(), "hyper", OPTION_SETS[2]),
        (dict(second_order=False), "hyper", OPTION_SETS[2]),
        (dict(), "hyper", {**OPTION_SETS[2], "predictor_bias": False}),
        (dict(), "hyper", {**OPTION_SETS[2], "refine_graph": False}),
    ],
    ids=[
        "second-order",
        "first-order",
        "no-inner-step",
        "shared-graph",
        "random-graph",
        "second-order-joint-options",
        "first-order-joint-options",
        "second-order-predictor-without-bias",
        "second-order-raw-graph",
    ],
)
def test_the_kernel_meta_gradient_is_autograd_s(cxx_compiler, variant, graph_mode, options):
    """meta_loss on the kernel and on autograd: the same loss and the same gradient to
    every meta parameter (generator included, through the refinement) to 1e-12 in
    float64, for second order, first order, no inner step, the graph ablations and
    the joint attention with the authors' options."""
    model = _model(graph_mode=graph_mode, **options)
    cfg = TrainConfig(inner_lr=0.3, alpha=0.3, **variant)
    batch = _meta_batch(model)
    loss_a, want = _meta_grads(model, batch, cfg, None)
    kernel = resolve_meta_backend(model, "kernel", torch.float64, CPU)
    loss_k, got = _meta_grads(model, batch, cfg, kernel)
    assert abs(loss_a - loss_k) <= 1e-12 * max(1.0, abs(loss_a))
    assert sorted(got) == sorted(want)
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-2
    for name in want:
        assert float((got[name] - want[name]).abs().max()) <= 1e-12 * scale, name
    if graph_mode == "hyper":
        assert float(want["generator.w1"].abs().max()) > 0


def test_the_second_order_term_is_in_the_kernel_meta_gradient(cxx_compiler):
    """First and second order differ (so the equality above tests the Hessian term)."""
    model = _model()
    batch = _meta_batch(model)
    kernel = resolve_meta_backend(model, "kernel", torch.float64, CPU)
    _, second = _meta_grads(model, batch, TrainConfig(inner_lr=0.3, alpha=0.0), kernel)
    _, first = _meta_grads(
        model, batch, TrainConfig(inner_lr=0.3, alpha=0.0, second_order=False), kernel
    )
    assert max(float((second[n] - first[n]).abs().max()) for n in second) > 1e-3


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_the_kernel_meta_gradient_in_float32(cxx_compiler, options):
    model = _model(torch.float32, **options)
    cfg = TrainConfig(inner_lr=0.3, alpha=0.3)
    batch = _meta_batch(model)
    _, want = _meta_grads(model, batch, cfg, None)
    _, got = _meta_grads(
        model, batch, cfg, resolve_meta_backend(model, "kernel", torch.float32, CPU)
    )
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        assert float((got[name] - want[name]).abs().max()) <= 1e-4 * scale, name


def test_meta_training_on_the_kernel_ends_where_autograd_does(cxx_compiler):
    """Whole meta-training (3 meta-steps of Adam, float64) on either backend ends at the
    same parameters (to 1e-8: Adam's g/√v magnifies the rounding of near-zero gradient
    entries; the parameters move by ~1e-3, a wrong term by as much)."""
    rows = _rows(_model(), 300, 8, seed=6)
    rows = Rows(rows.tokens, rows.weights, rows.labels, torch.arange(300) % 8)
    items = ItemSet([f"i{i}" for i in range(8)], rows.tokens[:8], rows.weights[:8])
    cfg = TrainConfig(meta_epochs=1, meta_batch=8, chunk_rows=16, inner_lr=0.1)
    ends = []
    for backend in ("autograd", "kernel"):
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        meta_train(
            model, rows, items, np.arange(300), cfg, device=CPU, progress=False, backend=backend
        )
        after = [p.detach().clone() for p in model.parameters()]
        assert max(float((p - b).abs().max()) for p, b in zip(after, before, strict=True)) > 1e-4
        ends.append(after)
    for a, k in zip(*ends, strict=True):
        assert float((a - k).abs().max()) <= 1e-8


def test_the_meta_backend_is_resolved_like_warm_up_s(monkeypatch, tmp_path, cxx_compiler):
    emerg = _model(torch.float32)
    assert resolve_meta_backend(emerg, "auto", torch.float32, CPU) is not None
    assert resolve_meta_backend(emerg, "autograd", torch.float32, CPU) is None
    deepfm = build_model(
        ModelConfig(kind="deepfm", n_fields=5, n_item_fields=3, side_fields=(1, 2), vocab_size=60)
    )
    assert resolve_meta_backend(deepfm, "auto", torch.float32, CPU) is None
    # on an accelerator the batched autograd step runs there (no build is tried)
    assert resolve_meta_backend(emerg, "auto", torch.float32, torch.device("cuda")) is None
    with pytest.raises(KernelUnavailableError, match="runs on the CPU"):
        resolve_meta_backend(emerg, "kernel", torch.float32, torch.device("cuda"))
    with pytest.raises(KernelUnavailableError, match="DeepFM"):
        resolve_meta_backend(deepfm, "kernel", torch.float32, CPU)
    with pytest.raises(ValueError, match="unknown meta-training backend"):
        resolve_meta_backend(emerg, "fast", torch.float32, CPU)  # type: ignore[arg-type]
    monkeypatch.setenv("CXX", "no-such-cxx-for-emerg")
    monkeypatch.setenv("EMERG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    assert resolve_meta_backend(emerg, "auto", torch.float32, CPU) is None
    with pytest.raises(KernelUnavailableError, match=r"no C\+\+ compiler"):
        resolve_meta_backend(emerg, "kernel", torch.float32, CPU)
