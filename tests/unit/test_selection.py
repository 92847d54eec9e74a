"""Model selection chooses each method's epochs with its own best warm-up, in order:
the pretraining epoch first, then meta-training from that epoch's weights."""

import pytest
import torch

from emerg_stream.meta import pipeline
from emerg_stream.meta.train import TrainConfig
from emerg_stream.meta.warmup import WarmupConfig

# validation score of each (stage, epoch) with the best warm-up; lr 0.5 is 0.01 worse
PRETRAIN = {1: 0.70, 2: 0.74, 3: 0.72, 4: 0.71}
META = {1: 0.745, 2: 0.76, 3: 0.75}


class _Marked(torch.nn.Module):
    """A stand-in model whose one parameter says which epoch produced its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.mark = torch.nn.Parameter(torch.zeros(()))


@pytest.fixture
def fake_training(monkeypatch):
    starts: list[float] = []

    def pretrain(model, rows, items, cfg, *, device, progress, on_epoch):
        for e in range(1, cfg.pretrain_epochs + 1):
            model.mark.data.fill_(e)
            on_epoch("pretrain", e)

    def meta_train(model, rows, items, ts, cfg, *, device, progress, on_epoch):
        starts.append(model.mark.item())
        for e in range(1, cfg.meta_epochs + 1):
            model.mark.data.fill_(100 + e)
            on_epoch("meta", e)

    def run_phases(model, data, wcfg, *, salt, device):
        m = model.mark.item()
        base = META[int(m) - 100] if m > 100 else PRETRAIN[int(m)]
        auc = base - (0.01 if wcfg.lr == 0.5 else 0.0)
        return {p: {"auc": auc} for p in ("cold", "warm_a", "warm_b", "warm_c")}, {}

    monkeypatch.setattr(pipeline, "pretrain", pretrain)
    monkeypatch.setattr(pipeline, "meta_train", meta_train)
    monkeypatch.setattr(pipeline, "run_phases", run_phases)
    monkeypatch.setattr(pipeline, "build_model", lambda cfg: _Marked())
    monkeypatch.setattr(pipeline, "model_config", lambda method, spec, **kw: None)
    return starts


GRID = (WarmupConfig(lr=0.5), WarmupConfig(lr=1.0))


class _Val:
    old_rows = old_items = old_timestamps = new = None


VAL = _Val()


def test_pretraining_epochs_are_chosen_even_when_meta_training_wins(fake_training):
    cfg = TrainConfig(pretrain_epochs=4, meta_epochs=3)
    p = pipeline.select_protocol(
        "emerg", None, VAL, cfg, device=torch.device("cpu"), progress=False, grid=GRID
    )
    assert p.pretrain_epochs == 2  # the best pretraining epoch, not the limit
    assert fake_training == [2.0]  # meta-training started from epoch 2's weights
    assert p.meta_epochs == 2
    assert p.warmup.lr == 1.0
    assert p.validation["score"] == pytest.approx(0.76)
    # every epoch was scored with its best warm-up, not a fixed one
    assert [c["score"] for c in p.validation["curve"]] == pytest.approx(
        [*PRETRAIN.values(), *META.values()]
    )


def test_no_meta_epoch_when_meta_training_does_not_help(fake_training, monkeypatch):
    for epoch, score in {1: 0.73, 2: 0.72, 3: 0.71}.items():
        monkeypatch.setitem(META, epoch, score)
    cfg = TrainConfig(pretrain_epochs=4, meta_epochs=3)
    p = pipeline.select_protocol(
        "metae", None, VAL, cfg, device=torch.device("cpu"), progress=False, grid=GRID
    )
    assert (p.pretrain_epochs, p.meta_epochs) == (2, 0)


def test_deepfm_is_never_meta_trained(fake_training):
    cfg = TrainConfig(pretrain_epochs=4, meta_epochs=3)
    p = pipeline.select_protocol(
        "deepfm", None, VAL, cfg, device=torch.device("cpu"), progress=False, grid=GRID
    )
    assert (p.pretrain_epochs, p.meta_epochs) == (2, 0)
    assert fake_training == []


def test_the_ablation_choices_of_the_command_line_are_the_table() -> None:
    import argparse

    from emerg_stream.ablations import ABLATIONS
    from emerg_stream.jobs import reproduce as job

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "ablation")
    assert list(action.choices or []) == list(ABLATIONS)
    # every fixed structure is one the selection could have chosen
    from emerg_stream.meta.pipeline import READINGS

    for name in ("joint-fm", "field-fm"):
        assert ABLATIONS[name][0] in READINGS


def test_a_fixed_structure_leaves_one_candidate_and_combines_with_an_ablation() -> None:
    from emerg_stream.ablations import STRUCTURES, with_structure
    from emerg_stream.meta.pipeline import READINGS, reading_candidates, reading_name

    # the names are the readings' names, in selection's order (the first wins a tie)
    assert [reading_name(r) for r in READINGS] == list(STRUCTURES)
    assert len(reading_candidates("emerg", {})) == 4
    fixed = with_structure("no-mask", "joint+fm")
    assert fixed == {"use_mask": False, "attention": "joint", "fm": True, "linear": True}
    assert reading_candidates("emerg", fixed) == [fixed]
    assert reading_candidates("deepfm", {}) == [{}]
    # an ablation that fixes the attention leaves the FM term open: two candidates
    assert [reading_name(c) for c in reading_candidates("emerg", {"attention": "field"})] == [
        "field",
        "field+fm",
    ]
    with pytest.raises(ValueError, match="fixes"):
        with_structure("joint-attention", "field")
    with pytest.raises(ValueError, match="unknown structure"):
        with_structure("none", "joint+attention")


def test_pick_reading_takes_the_first_best_and_records_every_score() -> None:
    from emerg_stream.meta.pipeline import Protocol, pick_reading
    from emerg_stream.meta.warmup import WarmupConfig

    def proto(score: float) -> Protocol:
        return Protocol(1, 0, WarmupConfig(), {"score": score})

    cands = [
        (proto(0.70), {"attention": "joint", "fm": False}),
        (proto(0.72), {"attention": "joint", "fm": True}),
        (proto(0.72), {"attention": "field", "fm": False}),
    ]
    protocol, overrides = pick_reading("emerg", cands)
    assert overrides == {"attention": "joint", "fm": True}  # the tie goes to the first
    assert protocol.validation["readings"] == {"joint": 0.70, "joint+fm": 0.72, "field": 0.72}
    one = [(proto(0.5), {})]
    assert pick_reading("deepfm", one)[0].validation == {"score": 0.5}
