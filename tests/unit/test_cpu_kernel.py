"""The compiled CPU warm-up kernel computes autograd's gradient, and degrades cleanly.

Each model shape compiles its own library (a second or two, cached under
``EMERG_KERNEL_CACHE``); the shapes below are chosen to cover every compile-time switch
(activation, layers, heads, fields, embedding size, float32/float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from emerg_stream.meta.rows import Rows
from emerg_stream.meta.warmup import WarmupConfig, resolve_backend, warm_up, warm_up_reference
from emerg_stream.model import ModelConfig, build_model, cpu_kernel, item_noise
from emerg_stream.model.cpu_kernel import KernelUnavailableError, phi_grad_kernel

CPU = torch.device("cpu")


def _model(dtype: torch.dtype = torch.float64, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    shape: dict[str, object] = dict(
        kind="emerg", n_fields=5, n_item_fields=3, side_fields=(1, 2), vocab_size=60
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


def _autograd(model, rows, phi, n_items):
    """Loss and gradients to the refined graphs and the ID embedding, by autograd."""
    graphs = model.graphs(phi["adj"]).detach().requires_grad_(True)
    id_emb = phi["id"].clone().requires_grad_(True)
    e_rest = model.prepare(rows.tokens, rows.weights).cache["e"]
    e = torch.cat([id_emb[rows.item].unsqueeze(1), e_rest], dim=1)
    logits = model.predictor(model.attention(model.interaction(e, graphs[rows.item])))
    losses = F.binary_cross_entropy_with_logits(logits, rows.labels, reduction="none")
    counts = torch.bincount(rows.item, minlength=n_items).clamp_min(1).to(losses.dtype)
    inv = (1.0 / counts)[rows.item]
    loss = (losses * inv).sum()
    d_graphs, d_id = torch.autograd.grad(loss, [graphs, id_emb])
    return loss.item(), d_graphs, d_id, e_rest, graphs.detach(), inv


SHAPES = [
    {},  # relu, L=2, H=3, F=5, D=16
    {"activation": "identity", "layers": 1, "heads": 1, "dim": 4},
    {"layers": 3, "heads": 2, "dim": 8, "n_fields": 7, "n_item_fields": 4, "side_fields": (3,)},
]


@pytest.mark.parametrize("shape", SHAPES, ids=["relu-L2-H3", "identity-L1-H1", "relu-L3-F7"])
def test_the_kernel_gradient_is_autograd_s_in_float64(c_compiler, shape):
    """Loss, ∂/∂graphs and ∂/∂id equal autograd's to 1e-12: a wrong term anywhere in the
    hand-written backward (attention, softmax, messages, predictor) shows up here."""
    model = _model(**shape)
    n_items = 6
    rows = _rows(model, 37, n_items, seed=1)  # 37 rows: two full tiles and a partial one
    phi = _phi(model, n_items)
    loss, d_graphs, d_id, e_rest, graphs, inv = _autograd(model, rows, phi, n_items)
    kernel = phi_grad_kernel(model, torch.float64, CPU)
    k_loss, k_graphs, k_id = kernel(model, e_rest, graphs, phi["id"], rows.item, rows.labels, inv)
    assert abs(k_loss - loss) <= 1e-12 * max(1.0, abs(loss))
    scale = max(d_graphs.abs().max().item(), d_id.abs().max().item())
    assert scale > 1e-3  # the comparison is not between zeros
    assert (k_graphs - d_graphs).abs().max().item() <= 1e-12 * scale
    assert (k_id - d_id).abs().max().item() <= 1e-12 * scale
    assert k_graphs[n_items - 1].abs().max() == 0 and k_id[n_items - 1].abs().max() == 0


def test_the_kernel_gradient_is_autograd_s_in_float32(c_compiler):
    model = _model(torch.float32, dim=16, heads=3)
    n_items = 5
    rows = _rows(model, 70, n_items, seed=2)
    phi = _phi(model, n_items)
    loss, d_graphs, d_id, e_rest, graphs, inv = _autograd(model, rows, phi, n_items)
    kernel = phi_grad_kernel(model, torch.float32, CPU)
    k_loss, k_graphs, k_id = kernel(model, e_rest, graphs, phi["id"], rows.item, rows.labels, inv)
    assert k_graphs.dtype == torch.float32
    assert abs(k_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    scale = max(d_graphs.abs().max().item(), d_id.abs().max().item())
    assert (k_graphs - d_graphs).abs().max().item() <= 1e-5 * scale
    assert (k_id - d_id).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_kernel_warm_up_equals_the_per_item_autograd_path(c_compiler, optimizer):
    """Whole phases: chunks of 4 items, a scaled graph lr, an item without rows."""
    model = _model()
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


def test_auto_takes_the_kernel_for_emerg_on_the_cpu_only(c_compiler):
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


def test_without_a_compiler_auto_falls_back_and_kernel_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-cc-for-emerg")
    monkeypatch.setenv("EMERG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    model = _model(torch.float32)
    assert resolve_backend(model, "auto", torch.float32, CPU) == ("autograd", None)
    with pytest.raises(KernelUnavailableError, match="no C compiler") as err:
        resolve_backend(model, "kernel", torch.float32, CPU)
    assert err.value.machine
    rows = _rows(model, 20, 3, seed=4)
    phi = _phi(model, 3)
    cfg = WarmupConfig()
    torch.testing.assert_close(  # the fallback is the same update
        warm_up(model, phi, rows, cfg), warm_up(model, phi, rows, cfg, backend="autograd")
    )


def test_a_build_is_cached_and_reused_across_processes(c_compiler, monkeypatch, tmp_path):
    """The library lands in EMERG_KERNEL_CACHE; a fresh process (a fresh in-memory
    table here) loads it without compiling again."""
    monkeypatch.setenv("EMERG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    model = _model(dim=4)
    phi_grad_kernel(model, torch.float64, CPU)
    built = list(tmp_path.glob("phi_grad-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    monkeypatch.setenv("CC", "no-such-cc-for-emerg")  # a rebuild would fail
    with pytest.raises(KernelUnavailableError):  # the compiler is looked up for the cache key
        phi_grad_kernel(model, torch.float64, CPU)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(cpu_kernel, "_KERNELS", {})
    phi_grad_kernel(model, torch.float64, CPU)
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("phi_grad-*.so")] == [stamp]


def test_rows_pointing_outside_the_items_are_refused(c_compiler):
    model = _model()
    rows = _rows(model, 10, 3, seed=5)
    phi = _phi(model, 3)
    _, _, _, e_rest, graphs, inv = _autograd(model, rows, phi, 3)
    kernel = phi_grad_kernel(model, torch.float64, CPU)
    bad = rows.item.clone()
    bad[4] = 3
    with pytest.raises(ValueError, match=r"row items must lie in \[0, 3\)"):
        kernel(model, e_rest, graphs, phi["id"], bad, rows.labels, inv)
