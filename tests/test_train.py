"""Training: optimisers, schedules, the L2 term, early stopping, repeatability, a run that learns."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cnnlab
from cnnlab.models import create_model
from cnnlab.training import EarlyStopper, LRSchedule, build_optimizer, l2_penalty
from cnnlab.training.callbacks import monitor_mode
from cnnlab.training.optim import OPTIMIZERS, l2_weights

from cnnlab.api import evaluate

from conftest import TINY_RUN_OVERRIDES, fit_run


# --------------------------------------------------------------------------- optimisers

@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return x, y


@pytest.mark.parametrize("name,lr", [("sgd", 0.05), ("adam", 0.01), ("adamw", 0.01), ("rmsprop", 0.005)])
def test_optimizer_reduces_loss(tiny_batch, name, lr):
    x, y = tiny_batch
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_channels=1, image_size=8, hidden=[32])
    opt = build_optimizer(model.parameters(), name, lr)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], (name, losses)


def test_optimizer_settings_reach_torch():
    p = [nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(p, "sgd", 0.1, momentum=0.8, nesterov=True, weight_decay=0.01)
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.8, True, 0.01)
    adam = build_optimizer(p, "adam", 0.002, beta1=0.8, beta2=0.99, eps=1e-6)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.8, 0.99)
    assert adam.param_groups[0]["eps"] == 1e-6
    assert isinstance(build_optimizer(p, "adamw", 0.1), torch.optim.AdamW)
    assert isinstance(build_optimizer(p, "rmsprop", 0.1), torch.optim.RMSprop)
    assert OPTIMIZERS.list() == ["sgd", "adam", "adamw", "rmsprop"]


def test_unknown_optimizer_message():
    with pytest.raises(ValueError, match="unknown optimizer 'adma'; choose one of: sgd, adam, adamw, rmsprop"):
        build_optimizer([nn.Parameter(torch.zeros(1))], "adma", 0.1)


def test_optimizer_skips_frozen_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3), requires_grad=False)
    opt = build_optimizer([a, b], "adam", 0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [1]


# --------------------------------------------------------------------------- schedules

LR0, SPE, EPOCHS = 0.1, 10, 10


def sched(name, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0)
    return LRSchedule(opt, name, LR0, SPE, kw.pop("epochs", EPOCHS), **kw)


def test_schedule_sets_the_optimizer_rate_at_construction_and_each_step():
    s = sched("step", step_size=1, gamma=0.5)
    assert s.opt.param_groups[0]["lr"] == pytest.approx(LR0)
    for _ in range(SPE):
        s.step()
    assert s.lr == s.opt.param_groups[0]["lr"] == pytest.approx(LR0 * 0.5)


def test_constant():
    s = sched("constant")
    assert {s.lr_at(i) for i in (0, 7, 55, 99)} == {LR0}


def test_step_schedule():
    s = sched("step", step_size=2, gamma=0.1)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(19) == pytest.approx(0.1)  # epoch 1.9
    assert s.lr_at(20) == pytest.approx(0.01)  # epoch 2.0: first decay
    assert s.lr_at(39) == pytest.approx(0.01)
    assert s.lr_at(40) == pytest.approx(0.001)
    assert s.lr_at(95) == pytest.approx(0.1 * 0.1 ** 4)


def test_exponential_schedule():
    s = sched("exponential", gamma=0.5)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(SPE) == pytest.approx(0.05)  # per epoch
    assert s.lr_at(3 * SPE) == pytest.approx(0.1 * 0.125)
    assert s.lr_at(SPE // 2) == pytest.approx(0.1 * math.sqrt(0.5))  # smooth within an epoch


def test_cosine_schedule():
    s = sched("cosine", min_lr=0.01)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(EPOCHS * SPE // 2) == pytest.approx(0.055)
    assert s.lr_at(EPOCHS * SPE) == pytest.approx(0.01)
    assert s.lr_at(EPOCHS * SPE + 30) == pytest.approx(0.01)
    lrs = [s.lr_at(i) for i in range(EPOCHS * SPE + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cyclic_schedule_triangle():
    s = sched("cyclic", min_lr=0.02, cycle_epochs=4)
    assert s.lr_at(0) == pytest.approx(0.02)  # trough
    assert s.lr_at(10) == pytest.approx(0.06)  # a quarter: halfway up
    assert s.lr_at(20) == pytest.approx(0.1)  # half a cycle: peak
    assert s.lr_at(30) == pytest.approx(0.06)
    assert s.lr_at(40) == pytest.approx(0.02)  # next trough
    assert s.lr_at(60) == pytest.approx(0.1)  # next peak
    lrs = [s.lr_at(i) for i in range(100)]
    assert max(lrs) == pytest.approx(0.1) and min(lrs) == pytest.approx(0.02)


def test_one_cycle_schedule():
    s = sched("one-cycle", pct_start=0.3)
    peak = int(0.3 * EPOCHS * SPE)
    assert s.lr_at(0) == pytest.approx(LR0 / 25)
    assert s.lr_at(peak) == pytest.approx(LR0)
    assert s.lr_at(EPOCHS * SPE) == pytest.approx(LR0 / 25e4)
    lrs = [s.lr_at(i) for i in range(EPOCHS * SPE + 1)]
    assert max(lrs) == pytest.approx(LR0) and lrs.index(max(lrs)) == peak
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_warmup_is_linear_then_the_schedule():
    s = sched("constant", warmup_epochs=2)
    for i in range(20):
        assert s.lr_at(i) == pytest.approx(LR0 * (i + 1) / 20), i
    assert s.lr_at(20) == pytest.approx(LR0)
    assert s.lr_at(0) > 0
    # warm-up scales whatever schedule it precedes
    assert sched("cosine", warmup_epochs=1).lr_at(4) == pytest.approx(0.5 * sched("cosine").lr_at(4))
    assert sched("cosine", warmup_epochs=1).lr_at(10) == pytest.approx(sched("cosine").lr_at(10))


def test_plateau_decays_after_patience():
    s = sched("plateau", patience=2, gamma=0.5)
    s.epoch_end(1.0)  # best
    s.epoch_end(0.9)  # better
    assert s.lr == pytest.approx(LR0)
    s.epoch_end(0.95)  # 1 bad epoch
    assert s.lr == pytest.approx(LR0)
    s.epoch_end(0.91)  # 2 bad epochs = patience → decay
    assert s.lr == pytest.approx(LR0 * 0.5)
    s.epoch_end(0.92)
    assert s.lr == pytest.approx(LR0 * 0.5)  # the count restarted
    s.epoch_end(0.93)
    assert s.lr == pytest.approx(LR0 * 0.25)
    s.epoch_end(0.5)  # improvement: no decay
    s.step()
    assert s.lr == pytest.approx(LR0 * 0.25)


def test_plateau_in_max_mode():
    s = sched("plateau", patience=1, gamma=0.1)
    s.epoch_end(0.5, "max")
    s.epoch_end(0.6, "max")
    assert s.lr == pytest.approx(LR0)
    s.epoch_end(0.55, "max")
    assert s.lr == pytest.approx(LR0 * 0.1)


def test_non_plateau_schedules_ignore_the_metric():
    s = sched("constant", patience=1)
    for v in (1.0, 2.0, 3.0, 4.0):
        s.epoch_end(v)
    assert s.lr == pytest.approx(LR0)


def test_schedule_state_round_trip():
    a = sched("plateau", patience=1, gamma=0.5)
    for _ in range(13):
        a.step()
    a.epoch_end(1.0)
    a.epoch_end(2.0)
    b = sched("plateau", patience=1, gamma=0.5)
    b.load_state_dict(a.state_dict())
    assert b.step_count == 13 and b.lr == pytest.approx(a.lr) == pytest.approx(LR0 * 0.5)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        sched("linear")


# --------------------------------------------------------------------------- L2 term

def test_l2_penalty_by_hand():
    torch.manual_seed(0)
    m = create_model("harahap-cnn", num_classes=3, image_size=8)
    with torch.no_grad():  # make BN and biases non-trivial so that including them would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(3.0)
                mod.bias.fill_(2.0)
            if getattr(mod, "bias", None) is not None:
                mod.bias.add_(1.0)
    ws = l2_weights(m)
    conv, lin1, lin2 = m.backbone[0], m.head[1], m.head[4]
    assert [id(w) for w in ws] == [id(conv.weight), id(lin1.weight), id(lin2.weight)]
    lam = 0.003
    by_hand = lam / 2 * sum(float((w.detach().double() ** 2).sum()) for w in (conv.weight, lin1.weight, lin2.weight))
    got = l2_penalty(ws, lam)
    assert got.item() == pytest.approx(by_hand, rel=1e-5)
    got.backward()  # d/dW λ/2·‖W‖² = λ·W
    assert torch.allclose(conv.weight.grad, lam * conv.weight.detach(), atol=1e-7)
    assert m.backbone[2].weight.grad is None and conv.bias.grad is None


def test_l2_skips_frozen_weights():
    m = create_model("harahap-cnn", num_classes=3, image_size=8)
    cnnlab.models.freeze_backbone(m)
    assert [id(w) for w in l2_weights(m)] == [id(m.head[1].weight), id(m.head[4].weight)]


# --------------------------------------------------------------------------- early stopping

@pytest.mark.parametrize("metric,mode", [("val_loss", "min"), ("loss", "min"), ("val_accuracy", "max"),
                                         ("accuracy", "max")])
def test_monitor_mode(metric, mode):
    assert monitor_mode(metric) == mode
    assert EarlyStopper(metric).mode == mode


def test_early_stopper_patience_min_mode():
    s = EarlyStopper("val_loss", patience=2)
    assert s.update(1, 1.0) and s.best_epoch == 1
    assert s.update(2, 0.8)
    assert not s.update(3, 0.85) and not s.should_stop
    assert not s.update(4, 0.8) and s.should_stop  # equal is not better
    assert s.best == 0.8 and s.best_epoch == 2


def test_early_stopper_max_mode_and_reset():
    s = EarlyStopper("val_accuracy", patience=2)
    s.update(1, 0.5)
    assert not s.update(2, 0.4)
    assert s.update(3, 0.6) and s.bad_epochs == 0 and not s.should_stop
    assert s.best_epoch == 3


def test_early_stopper_min_delta():
    s = EarlyStopper("val_loss", patience=1, min_delta=0.1)
    s.update(1, 1.0)
    assert not s.update(2, 0.95)  # better, but by less than min_delta
    assert s.should_stop and s.best_epoch == 1
    s = EarlyStopper("val_accuracy", patience=3, min_delta=0.05)
    s.update(1, 0.5)
    assert not s.update(2, 0.54)
    assert s.update(3, 0.56)


def test_early_stopper_without_patience_never_stops():
    s = EarlyStopper("val_loss")
    for e in range(1, 30):
        s.update(e, float(e))
    assert not s.should_stop and s.best_epoch == 1


def test_early_stopper_state_round_trip():
    s = EarlyStopper("val_loss", patience=3)
    s.update(1, 1.0)
    s.update(2, 2.0)
    t = EarlyStopper("val_loss", patience=3)
    t.load_state_dict(s.state_dict())
    assert (t.best, t.best_epoch, t.bad_epochs) == (1.0, 1, 1)


# --------------------------------------------------------------------------- training end to end

def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _weights_of(run):
    return load_file(str(run.path / "model.safetensors"))


EARLY_STOP = {"data.image_size": 14, "data.max_per_class": 20, "data.validation_split": 0.3, "data.batch_size": 32,
              "optim.lr": 0.01, "train.epochs": 20, "train.early_stopping.patience": 2}


def test_early_stopping_restores_the_best_epoch(tmp_path):
    run = fit_run(EARLY_STOP, out=tmp_path / "es")
    m = run.metrics
    rows = _read_csv(run.path / "history.csv")
    val_loss = [float(r["val_loss"]) for r in rows]
    best = m["best_epoch"]
    assert best == 1 + min(range(len(val_loss)), key=val_loss.__getitem__)
    assert m["stopped_early"] is True
    assert m["epochs_run"] == len(rows) == best + 2 < 20  # stopped, and the last epochs were worse
    # no test part (validation_split): the final metrics are on the validation part, with the
    # restored weights, so they reproduce the best epoch's row, not the last one
    assert m["evaluated_on"] == "val"
    assert m["loss"] == pytest.approx(val_loss[best - 1], rel=1e-5)
    assert m["loss"] < val_loss[-1]
    assert m["accuracy"] == pytest.approx(float(rows[best - 1]["val_accuracy"]), abs=1e-6)
    # and the file on disk holds those weights
    again = evaluate(run.path)
    assert again["loss"] == pytest.approx(val_loss[best - 1], rel=1e-5)


def test_best_epoch_by_val_accuracy_without_early_stopping(tmp_path):
    over = dict(EARLY_STOP, **{"train.epochs": 4, "train.monitor": "val_accuracy"})
    over.pop("train.early_stopping.patience")
    run = fit_run(over, out=tmp_path / "acc")
    acc = [r["val_accuracy"] for r in run.history]
    assert len(acc) == 4 and run.metrics["stopped_early"] is False
    first_best = acc.index(max(acc)) + 1
    assert run.metrics["best_epoch"] == first_best
    assert run.metrics["accuracy"] == pytest.approx(acc[first_best - 1], abs=1e-6)


REPEAT = {"data.image_size": 14, "data.max_per_class": 12, "data.batch_size": 16, "data.augment": True, "train.epochs": 2,
          "model.dropout": 0.3, "data.validation_split": 0.25}


def test_training_is_bit_for_bit_repeatable(tmp_path):
    a = fit_run(REPEAT, out=tmp_path / "a")
    b = fit_run(REPEAT, out=tmp_path / "b")
    c = fit_run(dict(REPEAT, **{"train.seed": 1}), out=tmp_path / "c")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    ha, hb, hc = (strip(_read_csv(r.path / "history.csv")) for r in (a, b, c))
    assert ha == hb  # the same strings in the CSV: identical floats
    wa, wb, wc = _weights_of(a), _weights_of(b), _weights_of(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
    assert (a.path / "split.json").read_text() == (b.path / "split.json").read_text()
    # another training seed: other weights and losses, but the same split (data.split_seed)
    assert ha != hc
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())
    assert a.split["train"] == c.split["train"] and a.split["val"] == c.split["val"]


def test_history_lr_follows_the_schedule(tmp_path):
    over = {"data.image_size": 14, "data.max_per_class": 8, "data.batch_size": 16, "train.epochs": 3,
            "schedule.name": "step",
            "schedule.step_size": 1, "schedule.gamma": 0.5, "optim.lr": 0.002}
    run = fit_run(over, out=tmp_path / "lr")
    assert [r["lr"] for r in run.history] == pytest.approx([0.002, 0.001, 0.0005])


def test_l2_is_reported_in_history(tmp_path):
    over = {"data.image_size": 14, "data.max_per_class": 8, "data.batch_size": 16, "train.epochs": 1,
            "regularization.l2": 0.01}
    run = fit_run(over, out=tmp_path / "l2")
    row = _read_csv(run.path / "history.csv")[0]
    assert float(row["l2_penalty"]) > 0


def test_offline_expansion_uses_the_configured_augmentation(tmp_path, monkeypatch):
    """data.expand makes augmented copies: with the aug_* keys set, those settings must be used."""
    import cnnlab.data.loader as loader

    seen = []
    real = loader.expand_offline

    def spy(images, labels, train_idx, copies, seed, aug_kwargs):
        out = real(images, labels, train_idx, copies, seed, aug_kwargs)
        seen.append((copies, dict(aug_kwargs), out))
        return out

    monkeypatch.setattr(loader, "expand_offline", spy)
    over = {"data.image_size": 14, "data.max_per_class": 6, "data.batch_size": 16, "train.epochs": 1,
            "data.expand": 1,
            "data.augment": False, "data.aug_rotation": 0.0, "data.aug_hflip": 1.0, "data.aug_scale": 0.0,
            "data.aug_translate": 0.0}
    run = fit_run(over, out=tmp_path / "exp")
    assert len(seen) == 1
    copies, kwargs, (images, _, copy_of) = seen[0]
    assert copies == 1
    split = run.split
    assert split["expanded"]["copy_of"] == copy_of and sorted(copy_of) == sorted(split["train"])
    n = len(images) - len(copy_of)
    assert kwargs == {"rotation": 0.0, "hflip": 1.0, "scale": 0.0, "translate": 0.0}, kwargs
    assert torch.equal(images[n:], images[copy_of].flip(3))


def test_frozen_backbone_stays_frozen_in_training(tiny_run, tmp_path):
    src = load_file(str(tiny_run.path / "model.safetensors"))
    over = dict(TINY_RUN_OVERRIDES, **{"model.weights": str(tiny_run.path / "model.safetensors"),
                                       "model.freeze": "backbone", "train.epochs": 1, "train.seed": 3,
                                       "data.augment": True})
    run = fit_run(over, out=tmp_path / "frozen")
    out = _weights_of(run)
    backbone = [k for k in src if k.startswith("backbone.")]
    assert "backbone.2.running_mean" in backbone  # harahap-cnn's batch norm
    for k in backbone:  # weights *and* batch-norm statistics untouched
        assert torch.equal(out[k], src[k]), k
    assert any(not torch.equal(out[k], src[k]) for k in src if k.startswith("head."))
    assert run.metrics["trainable_parameters"] < run.metrics["parameters"]


def test_a_run_that_really_learns(tmp_path):
    over = {"data.max_per_class": 200, "data.batch_size": 64, "train.epochs": 3, "train.seed": 0}
    run = fit_run(over, out=tmp_path / "learn")
    m = run.metrics
    assert m["evaluated_on"] == "test" and m["n"] == 300
    assert m["accuracy"] > 0.6, m["accuracy"]  # chance is 0.1
    assert m["accuracy_ci95"][0] > 0.5
    assert m["chance"]["p_value_above_chance"] < 1e-10
    losses = [r["loss"] for r in run.history]
    assert losses[-1] < losses[0]
    assert run.history[-1]["val_accuracy"] > 0.6


# --------------------------------------------------------------------------- precision owns its scaler

def test_the_loss_scale_carries_over_epochs_and_checkpoints(tmp_path):
    """A scaler forced on the CPU (as 16-mixed has on CUDA): its scale doubles every 3 clean steps across the
    epoch boundary, is saved in each checkpoint, and a fresh Precision restored from it goes on from there
    (a new GradScaler per epoch, the old behaviour, would have restarted at 4 each epoch)."""
    from types import SimpleNamespace

    from cnnlab.data.loader import DeviceLoader, Normalizer
    from cnnlab.training import TrainState, fit, read_checkpoint, restore_checkpoint, save_checkpoint
    from cnnlab.training.runtime import Precision, Runtime

    torch.manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 2, (40,))
    loader = DeviceLoader(x, y, Normalizer([0.5], [0.25]), 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = create_model("mlp", 2, 1, 8)
    opt = build_optimizer(model.parameters(), "sgd", 0.01)
    schedule = LRSchedule(opt, "constant", 0.01, len(loader), 2)
    runtime = Runtime("cpu")
    runtime.precision = Precision("32", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=3))
    scales = []

    def on_epoch(st: TrainState) -> None:
        save_checkpoint(tmp_path, st, model, opt, schedule, stopper, loader, {}, runtime.precision)
        scales.append(read_checkpoint(tmp_path)[1]["scaler"]["scale"])

    stopper = EarlyStopper("loss")
    fit(model, SimpleNamespace(train=loader, val=None), opt, schedule, runtime, epochs=2, stopper=stopper,
        on_epoch=on_epoch)
    assert scales == [4.0 * 2 ** (5 // 3), 4.0 * 2 ** (10 // 3)]  # 5 steps an epoch, doubling every 3
    fresh = Precision("32", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=3))
    tensors, meta = read_checkpoint(tmp_path)
    restore_checkpoint(tensors, meta, model, opt, schedule, stopper, loader, fresh)
    assert fresh.scaler.get_scale() == 32.0 and fresh.scaler.state_dict()["_growth_tracker"] == 1
