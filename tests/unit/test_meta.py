"""Meta-learning, warm-up, metrics and checkpoints on small synthetic tensors."""

import itertools

import numpy as np
import pytest
import torch

from emerg_stream.errors import ModelError
from emerg_stream.meta.checkpoint import load_checkpoint, save_checkpoint
from emerg_stream.meta.losses import per_item_mean_loss
from emerg_stream.meta.metrics import f1_at_mean, roc_auc
from emerg_stream.meta.rows import ItemSet, Rows
from emerg_stream.meta.train import TaskTable, TrainConfig, meta_train, pretrain
from emerg_stream.meta.warmup import WarmupConfig, warm_up, warm_up_reference
from emerg_stream.model import ModelConfig, build_model, item_noise

F, T, V = 6, 2, 60
CPU = torch.device("cpu")


def make_data(n_rows=600, n_items=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    item = torch.randint(0, n_items, (n_rows,), generator=g)
    tokens = torch.randint(1, V, (n_rows, F, T), generator=g)
    tokens[:, 0, 0] = item + 1
    # item side features are a function of the item
    tokens[:, 1:3, :] = (item[:, None, None] * 3 + torch.arange(2)[None, :, None] + 20) % V + 1
    weights = torch.full((n_rows, F, T), 0.5, dtype=dtype)
    labels = (torch.rand(n_rows, generator=g) < 0.4).to(dtype)
    rows = Rows(tokens, weights, labels, item)
    first = [int((item == i).nonzero()[0]) for i in range(n_items)]
    items = ItemSet([f"i{i}" for i in range(n_items)], tokens[first], weights[first])
    return rows, items


def config(kind="emerg", **kw):
    return ModelConfig(
        kind=kind, n_fields=F, n_item_fields=3, side_fields=(1, 2), vocab_size=V + 1, dim=8, **kw
    )


def test_hypernetwork_gets_gradient_from_the_query_loss_alone():
    torch.manual_seed(0)
    model = build_model(config())
    rows, items = make_data()
    n = len(items)
    phi0 = model.cold_params(items.tokens, items.weights, item_noise(items.ids, model.noise_dim))
    sup = rows.select(torch.arange(0, 300))
    qry = rows.select(torch.arange(300, 600))
    names = list(phi0)
    phi0 = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in phi0.items()}
    grads = torch.autograd.grad(
        per_item_mean_loss(model, sup, phi0, n).sum(), [phi0[k] for k in names], create_graph=True
    )
    phi1 = {k: phi0[k] - 0.01 * g for k, g in zip(names, grads, strict=True)}
    per_item_mean_loss(model, qry, phi1, n).mean().backward()  # L_warm only (alpha = 0)
    assert model.generator.w1.grad is not None
    assert model.generator.w1.grad.abs().sum() > 0
    assert model.generator.w2.grad.abs().sum() > 0


def test_meta_training_moves_the_hypernetwork():
    torch.manual_seed(0)
    model = build_model(config())
    rows, items = make_data()
    before = model.generator.w1.detach().clone()
    cfg = TrainConfig(meta_epochs=1, meta_batch=8, alpha=0.0, chunk_rows=16)
    meta_train(model, rows, items, np.arange(len(rows)), cfg, device=CPU, progress=False)
    assert not torch.equal(before, model.generator.w1.detach())


@pytest.mark.parametrize("kind", ["emerg", "deepfm", "metae"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_warm_up_equals_the_per_item_path(kind, optimizer):
    torch.manual_seed(0)
    model = build_model(config(kind)).double()
    rows, items = make_data(dtype=torch.float64)
    phi = model.cold_params(
        items.tokens, items.weights, item_noise(items.ids, model.noise_dim).double()
    )
    phi = {k: v.detach() for k, v in phi.items()}
    cfg = WarmupConfig(steps=4, lr=0.05, optimizer=optimizer)
    support = rows.select(torch.arange(0, 200))
    batched = warm_up(model, phi, support, cfg)
    reference = warm_up_reference(model, phi, support, cfg)
    for k in phi:
        assert (batched[k] - reference[k]).abs().max() <= 1e-5
        # it did move (the raw graph's gradient is small: min-max scaling divides it)
        assert (batched[k] - phi[k]).abs().max() > (1e-4 if k == "id" or optimizer == "adam" else 0)


def _f64_warm_up_inputs(kind="emerg", **kw):
    torch.manual_seed(0)
    model = build_model(config(kind, **kw)).double()
    rows, items = make_data(dtype=torch.float64)
    phi = model.cold_params(
        items.tokens, items.weights, item_noise(items.ids, model.noise_dim).double()
    )
    return model, {k: v.detach() for k, v in phi.items()}, rows.select(torch.arange(0, 200))


@pytest.mark.parametrize("backend", ["autograd", "kernel"])
def test_warm_up_in_chunks_equals_the_per_item_path(backend, request):
    """Chunks that split the items (5 + 5 + 2 of 12) change nothing: the items are
    independent and each keeps its own rows (autograd and the CPU kernel alike)."""
    if backend == "kernel":
        request.getfixturevalue("cxx_compiler")
    model, phi, support = _f64_warm_up_inputs()
    cfg = WarmupConfig(steps=4, lr=0.05, optimizer="adam")
    chunked = warm_up(model, phi, support, cfg, chunk=5, backend=backend)
    reference = warm_up_reference(model, phi, support, cfg)
    for k in phi:
        assert (chunked[k] - reference[k]).abs().max() <= 1e-12


@pytest.mark.slow
def test_compiled_warm_up_equals_the_per_item_path():
    """warm_up(backend="compile") (torch.compile, about a minute to compile) is the same
    update; the shared parameters keep requires_grad afterwards."""
    model, phi, support = _f64_warm_up_inputs()
    cfg = WarmupConfig(steps=4, lr=0.05)
    compiled = warm_up(model, phi, support, cfg, chunk=5, backend="compile")
    reference = warm_up_reference(model, phi, support, cfg)
    for k in phi:
        assert (compiled[k] - reference[k]).abs().max() <= 1e-10
        assert (compiled[k] - phi[k]).abs().max() > 0
    assert all(p.requires_grad for p in model.parameters())


def test_warm_up_changes_only_items_with_rows_and_never_the_model():
    torch.manual_seed(0)
    model = build_model(config())
    rows, items = make_data()
    phi = {
        k: v.detach()
        for k, v in model.cold_params(
            items.tokens, items.weights, item_noise(items.ids, model.noise_dim)
        ).items()
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    support = rows.select((rows.item != 3).nonzero().squeeze(1))
    out = warm_up(model, phi, support, WarmupConfig(steps=3, lr=0.1))
    assert torch.equal(out["adj"][3], phi["adj"][3]) and torch.equal(out["id"][3], phi["id"][3])
    assert not torch.equal(out["adj"][0], phi["adj"][0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_warm_up_lowers_the_support_loss():
    torch.manual_seed(0)
    model = build_model(config())
    rows, items = make_data()
    phi = {
        k: v.detach()
        for k, v in model.cold_params(
            items.tokens, items.weights, item_noise(items.ids, model.noise_dim)
        ).items()
    }
    before = per_item_mean_loss(model, rows, phi, len(items)).sum()
    after = per_item_mean_loss(
        model, rows, warm_up(model, phi, rows, WarmupConfig(steps=10, lr=0.5)), len(items)
    ).sum()
    assert after < before


def test_cold_params_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = build_model(config())
    _, items = make_data()
    noise = item_noise(items.ids, model.noise_dim)
    whole = model.cold_params(items.tokens, items.weights, noise)
    one = model.cold_params(
        items.tokens[5:6], items.weights[5:6], item_noise(items.ids[5:6], model.noise_dim)
    )
    for k in whole:
        assert torch.allclose(whole[k][5], one[k][0], atol=1e-6)


def test_item_noise_is_deterministic_normal_and_salted():
    a = item_noise(["x", "y"], 64)
    assert torch.equal(a, item_noise(["y", "x"], 64).flip(0))
    assert not torch.equal(a, item_noise(["x", "y"], 64, salt=1))
    big = item_noise([str(i) for i in range(2000)], 32)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02


def test_training_is_deterministic_under_a_seed():
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        model = build_model(config())
        rows, items = make_data()
        cfg = TrainConfig(
            seed=3, pretrain_epochs=1, meta_epochs=1, batch_size=64, meta_batch=4, chunk_rows=8
        )
        pretrain(model, rows, items, cfg, device=CPU, progress=False)
        meta_train(model, rows, items, np.arange(len(rows)), cfg, device=CPU, progress=False)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


@pytest.mark.parametrize("kind", ["emerg", "deepfm"])
def test_id_dropout_hides_the_id_embedding_from_pretraining(kind):
    rows, items = make_data()
    rows.tokens[:, 1:][rows.tokens[:, 1:] <= len(items)] = len(items) + 1  # ID rows: IDs only
    ids = torch.unique(rows.tokens[:, 0, 0])
    moved = {}
    for p in (0.0, 1 - 1e-9):
        torch.manual_seed(7)
        model = build_model(config(kind))
        before = model.embedding.table.weight.detach().clone()
        cfg = TrainConfig(seed=3, pretrain_epochs=1, batch_size=64, id_dropout=p)
        pretrain(model, rows, items, cfg, device=CPU, progress=False)
        delta = (model.embedding.table.weight.detach() - before).abs()
        moved[p] = (float(delta[ids].max()), float(delta.max()))
    assert moved[0.0][0] > 1e-3  # without it, pretraining trains the items' ID rows
    # With every row's ID zeroed, no gradient reaches the ID rows; the others still train.
    assert moved[1 - 1e-9][0] == 0.0 and moved[1 - 1e-9][1] > 1e-3
    with pytest.raises(ValueError, match="id_dropout"):
        TrainConfig(id_dropout=1.0)


def test_tasks_are_consecutive_time_ordered_chunks():
    item = np.array([0] * 8 + [1] * 4)
    ts = np.array([8, 7, 6, 5, 4, 3, 2, 1, 1, 2, 3, 4])
    table = TaskTable.build(item, ts, 2)
    tasks = table.tasks()
    assert tasks.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    rng = np.random.default_rng(0)
    assert sorted(table.sample(0, 0, 10, rng).tolist()) == [6, 7]  # the two earliest rows
    assert sorted(table.sample(0, 3, 10, rng).tolist()) == [0, 1]


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3)))


def test_f1_at_mean_threshold():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.2, 0.8, 0.1])  # mean 0.5 -> predicts rows 0 and 2
    assert f1_at_mean(y, s) == pytest.approx(0.5)


def test_checkpoint_round_trip_and_tamper_refusal(tmp_path):
    torch.manual_seed(0)
    model = build_model(config()).eval()
    rows, items = make_data()
    spec = {"fields": ["a", "b"]}
    meta = {"seed": 1, "noise_salt": 1, "warmup": {"steps": 2}, "split": {"n": 9, "k": 3}}
    saved = save_checkpoint(tmp_path / "ck", model, spec, meta)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.model_version == saved.model_version and loaded.feature_spec == spec
    phi = loaded.model.trained_params(items.tokens, items.weights)
    with torch.no_grad():
        a = model(
            rows.tokens, rows.weights, model.trained_params(items.tokens, items.weights), rows.item
        )
        b = loaded.model(rows.tokens, rows.weights, phi, rows.item)
    assert torch.equal(a, b)
    blob = (tmp_path / "ck" / "model.pt").read_bytes()
    (tmp_path / "ck" / "model.pt").write_bytes(blob[:-10] + bytes(10))
    with pytest.raises(ModelError, match="does not match its manifest"):
        load_checkpoint(tmp_path / "ck")


class Evil:
    """Stands for any pickled object a checkpoint must not carry."""


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    import hashlib
    import json

    d = tmp_path / "ck"
    d.mkdir()
    torch.save({"model": {}, "config": {}, "obj": Evil()}, d / "model.pt")
    sha = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps({"files": {"model.pt": sha}}))
    with pytest.raises(ModelError, match="not a plain weights file"):
        load_checkpoint(d)
