"""The model, the warm-up and the trainers give the host's results on every device.

Each test runs on ``cpu`` (always, so this file's own code is exercised on every run)
and on ``cuda`` (marked ``gpu``: only where CUDA is present; ``make test`` leaves it out,
``pytest -m gpu`` runs it on a GPU machine). On the GPU the warm-up is the batched
autograd path (the CPU kernel does not serve CUDA) and host batches go through pinned,
asynchronous copies (``meta.rows.to_device``); the results must still be the host's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from devices import DEVICES

from emerg_stream.meta.evaluate import cold_start
from emerg_stream.meta.rows import ItemSet, Rows, to_device
from emerg_stream.meta.train import TrainConfig, meta_train, pretrain
from emerg_stream.meta.warmup import WarmupConfig, warm_up, warm_up_reference
from emerg_stream.model import ModelConfig, build_model, item_noise

CPU = torch.device("cpu")
V, F, T = 50, 5, 3


def _data(n_rows: int = 300, n_items: int = 10, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    item = torch.randint(0, n_items, (n_rows,), generator=g)
    tokens = torch.randint(1, V, (n_rows, F, T), generator=g)
    tokens[:, 0, 0] = item + 1
    tokens[:, 1:3, :] = (item[:, None, None] * 3 + torch.arange(2)[None, :, None] + 20) % V + 1
    weights = torch.rand(n_rows, F, T, generator=g).to(dtype)
    labels = (torch.rand(n_rows, generator=g) < 0.4).to(dtype)
    first = [int((item == i).nonzero()[0]) for i in range(n_items)]
    items = ItemSet([f"i{i}" for i in range(n_items)], tokens[first], weights[first])
    return Rows(tokens, weights, labels, item), items


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="emerg", n_fields=F, n_item_fields=3, side_fields=(1, 2), vocab_size=V + 1, dim=8
    )
    return build_model(cfg).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_host_batches_reach_the_device_unchanged(device):
    rows, items = _data()
    dev = torch.device(device)
    moved = rows.to(dev)
    for a, b in zip(
        (moved.tokens, moved.weights, moved.labels, moved.item),
        (rows.tokens, rows.weights, rows.labels, rows.item),
        strict=True,
    ):
        assert a.device.type == dev.type and torch.equal(a.cpu(), b)
    assert torch.equal(items.to(dev).tokens.cpu(), items.tokens)
    assert torch.equal(to_device(rows.labels, dev).cpu(), rows.labels)


@pytest.mark.parametrize("device", DEVICES)
def test_cold_start_and_warm_up_on_the_device_equal_the_host_reference(device):
    """φ⁰ and a whole adam phase on the device against autograd one item at a time on
    the host, in float64."""
    dev = torch.device(device)
    model = _model(torch.float64)
    rows, items = _data(dtype=torch.float64)
    # the fresh ID embedding is float32 noise (item_noise): lift it to the model's float64
    phi_host = {k: v.double() for k, v in cold_start(model, items, salt=3, device=CPU).items()}
    cfg = WarmupConfig(steps=3, lr=0.05, optimizer="adam")
    reference = warm_up_reference(model, phi_host, rows, cfg)
    model_dev = model.to(dev)
    phi_dev = {k: v.double() for k, v in cold_start(model_dev, items, salt=3, device=dev).items()}
    for k in phi_host:
        assert phi_dev[k].device.type == dev.type
        torch.testing.assert_close(phi_dev[k].cpu(), phi_host[k], rtol=0, atol=1e-12)
    got = warm_up(model_dev, phi_dev, rows.to(dev), cfg)
    for k in phi_host:
        assert got[k].device.type == dev.type
        assert (got[k].cpu() - reference[k]).abs().max() <= 1e-10
        assert (got[k].cpu() - phi_host[k]).abs().max() > 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_the_device_ends_where_the_host_does(device):
    """Pretraining and second-order meta-training, one epoch each, from the same seed:
    the same parameters up to float32 reduction order."""
    dev = torch.device(device)
    rows, items = _data()
    cfg = TrainConfig(
        seed=3, pretrain_epochs=1, meta_epochs=1, batch_size=64, meta_batch=4, chunk_rows=8
    )
    states = {}
    for where in (CPU, dev):
        model = _model().to(where)
        pretrain(model, rows, items, cfg, device=where, progress=False)
        meta_train(model, rows, items, np.arange(len(rows)), cfg, device=where, progress=False)
        states[where.type] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    moved = False
    for k, v in states["cpu"].items():
        torch.testing.assert_close(states[dev.type][k], v, rtol=1e-4, atol=1e-5)
        moved |= bool((v - _model().state_dict()[k]).abs().max() > 1e-4)
    assert moved


def test_item_noise_does_not_depend_on_the_device():
    """The fresh ID embeddings come from the item ids on the host, whatever the device."""
    a = item_noise(["x", "y"], 8, salt=1)
    assert a.device.type == "cpu" and torch.equal(a, item_noise(["x", "y"], 8, salt=1))
