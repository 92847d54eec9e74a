"""The method registry and the checkpoint contract: one owner each.

* every list of methods derives from :data:`emerg_stream.methods.METHODS` (a test scans
  the sources for a hand-written list of method names);
* every registered method builds, has the φ the registry says, and runs in the stream's
  φ slots;
* :func:`parse_meta` is the one parser of a checkpoint's facts: an unknown method or a
  missing fact is a one-line ``ModelError``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import worker_world as ww

from emerg_stream.devices import DEVICES, resolve_device
from emerg_stream.errors import ConfigError, ModelError
from emerg_stream.features import FeatureSpec
from emerg_stream.meta.checkpoint import load_checkpoint, parse_meta, save_checkpoint
from emerg_stream.meta.pipeline import METHODS as PIPELINE_METHODS
from emerg_stream.methods import METHOD_NAMES, METHODS, get_method
from emerg_stream.model import DeepFM, ModelConfig, build_model, item_noise
from emerg_stream.serving.phi import arrays_to_phi, phi_to_arrays
from emerg_stream.stream.handler import ParamsArrays

ROOT = Path(__file__).resolve().parents[2]
F, D = 5, 4
META = {"noise_salt": 7, "warmup": {"steps": 2, "lr": 0.1}, "split": {"n": 20, "k": 3}}


def config(kind: str) -> ModelConfig:
    return ModelConfig(
        kind=kind, n_fields=F, n_item_fields=3, side_fields=(1, 2), vocab_size=30, dim=D
    )


def _string_lists(tree: ast.AST) -> list[tuple[int, set[str]]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            values = {
                e.value
                for e in node.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            }
            out.append((node.lineno, values))
        elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
            sl = node.slice
            elts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
            values = {e.value for e in elts if isinstance(e, ast.Constant)}
            out.append((node.lineno, {v for v in values if isinstance(v, str)}))
    return out


def test_no_source_lists_the_methods_by_hand() -> None:
    """A list, tuple, set or Literal holding two or more method names outside the registry."""
    names = set(METHOD_NAMES)
    found = []
    for folder in ("emerg_stream", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "emerg_stream" / "methods.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for line, values in _string_lists(tree):
                if len(values & names) >= 2:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {sorted(values & names)}")
    assert not found, "derive these from emerg_stream.methods.METHODS:\n" + "\n".join(found)


def test_the_scan_finds_a_hand_written_list() -> None:
    tree = ast.parse('CHOICES = ["emerg", "deepfm"]\nKind = Literal["metae", "emerg"]\n')
    hits = {frozenset(v) for _, v in _string_lists(tree) if len(v & set(METHOD_NAMES)) >= 2}
    assert hits == {frozenset({"emerg", "deepfm"}), frozenset({"metae", "emerg"})}


def _choices(job: str, flag: str) -> object:
    import importlib

    module = importlib.import_module(f"emerg_stream.jobs.{job}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return next(a for a in parser._actions if flag in a.option_strings)


def test_cli_choices_and_the_pipeline_derive_from_the_registry() -> None:
    method = _choices("train", "--method")
    assert tuple(method.choices) == METHOD_NAMES  # type: ignore[attr-defined]
    assert _choices("reproduce", "--methods").default == ",".join(METHOD_NAMES)  # type: ignore[attr-defined]
    assert PIPELINE_METHODS == METHOD_NAMES
    for job in ("train", "reproduce", "evaluate", "demo", "worker"):
        assert tuple(_choices(job, "--device").choices) == DEVICES  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_builds_its_class_with_the_registered_phi(name: str) -> None:
    method = get_method(name)
    model = build_model(config(name))
    assert type(model) is method.model_class()
    assert model.phi_names == method.phi_names
    ids = ["a", "b", "c"]
    tokens = torch.randint(1, 30, (3, F, 2))
    weights = torch.ones(3, F, 2)
    phi = model.cold_params(tokens, weights, item_noise(ids, model.noise_dim))
    assert set(phi) == set(method.phi_names)
    for e in method.phi:
        assert tuple(phi[e.name].shape) == (3, *e.shape(F, D))
    # the stream's slots carry it and give it back unchanged
    arrays = phi_to_arrays(method, phi)
    layout = method.layout(F, D)
    assert arrays.adjacency.shape == (3, layout.adjacency_size)
    assert layout.fits(arrays.adjacency.shape[1], arrays.id_embedding.shape[1])
    back = arrays_to_phi(method, arrays, F, D, "cpu")
    for k in phi:
        assert torch.equal(back[k], phi[k].detach().float())


def test_only_emerg_has_a_graph_slot() -> None:
    assert [m.name for m in METHODS.values() if m.has_graph] == ["emerg"]
    assert ParamsArrays.zeros(2, get_method("deepfm").layout(F, D)).adjacency.shape == (2, 0)


def test_a_slot_of_the_wrong_width_is_refused() -> None:
    bad = ParamsArrays(np.zeros((1, 4), np.float32), np.zeros((1, D), np.float32))
    with pytest.raises(ModelError, match="adj of method 'emerg'"):
        arrays_to_phi(get_method("emerg"), bad, F, D, "cpu")


def test_an_unknown_method_is_one_line() -> None:
    with pytest.raises(ModelError, match=r"unknown method 'mwuf'; this build knows emerg") as e:
        get_method("mwuf")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="unknown method 'mwuf'"):
        build_model(config("mwuf"))


def test_meta_parses_once_and_round_trips() -> None:
    cfg = config("metae")
    meta = parse_meta({**META, "old_item_ids": [1, "x"], "custom": 3}, cfg, {}, "v1")
    assert (meta.method, meta.noise_salt, meta.k, meta.n) == ("metae", 7, 3, 20)
    assert meta.warmup.steps == 2 and meta.old_item_ids == ("1", "x")
    assert meta.extra == {"custom": 3}
    assert parse_meta(meta.to_dict(), cfg, {}, "v1") == meta


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"noise_salt": None}, "meta lacks noise_salt"),
        ({"warmup": None}, "meta lacks warmup"),
        ({"split": None}, "meta lacks split"),
        ({"split": {"n": 3}}, "'split' must hold k"),
        ({"split": {"k": 0}}, "split.k must be a positive integer"),
        ({"noise_salt": "7"}, "'noise_salt' must be an integer"),
        ({"warmup": {"optimizer": "rmsprop"}}, "invalid warm-up protocol"),
        ({"warmup": {"nope": 1}}, "invalid warm-up protocol"),
        ({"method": "deepfm"}, "meta says method 'deepfm' but the model config is 'emerg'"),
    ],
)
def test_a_missing_or_invalid_fact_is_one_line(change: dict[str, object], message: str) -> None:
    raw = {**META, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelError, match=message) as e:
        parse_meta(raw, config("emerg"), {}, "v1", where="checkpoint X")
    assert str(e.value).startswith("checkpoint X: ") and "\n" not in str(e.value)


def test_a_checkpoint_of_an_unknown_method_is_refused_in_one_line(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", build_model(config("deepfm")), {}, META)
    payload = torch.load(tmp_path / "ck" / "model.pt", weights_only=True)
    payload["config"]["kind"] = "mwuf"
    torch.save(payload, tmp_path / "ck" / "model.pt")
    sha = hashlib.sha256((tmp_path / "ck" / "model.pt").read_bytes()).hexdigest()
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps({"files": {"model.pt": sha}}))
    with pytest.raises(ModelError, match="unknown method 'mwuf'; this build knows") as e:
        load_checkpoint(tmp_path / "ck")
    assert "\n" not in str(e.value)


def test_a_checkpoint_without_its_facts_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="meta lacks noise_salt"):
        save_checkpoint(tmp_path / "ck", build_model(config("emerg")), {}, {"seed": 1})
    assert not (tmp_path / "ck").exists()


def test_one_device_resolver() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_the_changelog_codec_carries_an_id_only_phi() -> None:
    """DeepFM/MetaE state: an id embedding without an adjacency survives the changelog."""
    from emerg_stream.state.codec import ItemStateCodec
    from emerg_stream.state.item import ItemTask

    codec = ItemStateCodec(dedupe_window=100)
    emb = np.arange(D, dtype=np.float32) / 3
    task = ItemTask("n1", phase="warm_a", version=2, adjacency=[], id_embedding=emb)
    back = codec.decode(codec.encode(task), "n1")
    assert back.id_embedding is not None and back.adjacency is not None
    np.testing.assert_array_equal(back.id_embedding, emb)
    assert back.adjacency.size == 0 and back.n_fields == 0
    assert get_method("deepfm").layout(F, D).fits(back.adjacency.size, back.id_embedding.size)
    assert not get_method("emerg").layout(F, D).fits(back.adjacency.size, back.id_embedding.size)


class Toy(DeepFM):
    """A stand-in new method: DeepFM whose cold start is generated (its own class)."""

    generates_id = True


def test_a_new_method_is_its_class_plus_one_registry_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Registering ``toy`` (nothing else) makes it build, save, load and serve the worker."""
    from emerg_stream.methods import Method, PhiEntry
    from emerg_stream.serving.handler import TorchWarmupHandler
    from emerg_stream.stream.handler import ItemFeatures

    toy = Method("toy", f"{__name__}:Toy", (PhiEntry("id", "embedding"),), True, "gen", "id")
    monkeypatch.setitem(METHODS, "toy", toy)
    spec = FeatureSpec.fit(ww.SCHEMA, ww.make_world(n_new=2, n_old=2).table)
    cfg = ModelConfig(
        kind="toy",
        n_fields=spec.n_fields,
        n_item_fields=spec.n_item_fields,
        side_fields=tuple(j for j, f in enumerate(spec.fields) if f.side == "item" and j),
        vocab_size=spec.total_size,
        dim=D,
        mlp_hidden=(8,),
    )
    save_checkpoint(tmp_path / "ck", build_model(cfg), spec.to_dict(), META)
    handler = TorchWarmupHandler(load_checkpoint(tmp_path / "ck"), torch.device("cpu"))
    assert isinstance(handler.model, Toy) and handler.layout.method == "toy"
    items = [ItemFeatures("a", {"genre": "drama"}, {}, {"price": 1.0})]
    cold = handler.cold_start(items)
    assert cold.adjacency.shape == (1, 0) and cold.id_embedding.shape == (1, D)
    session = handler.open_batch(items, cold, np.zeros(1, dtype=np.bool_))
    row = {"user_id": "u1", "categorical": {"city": "x"}, "multi": {}, "numeric": {}, "label": 1}
    session.update(np.zeros(1, dtype=np.int64), [[row] * 3])  # type: ignore[list-item]
    assert not np.allclose(
        session.params(np.zeros(1, dtype=np.int64)).id_embedding, cold.id_embedding
    )
