"""`cnnlab lr-find`: the learning-rate range test on the real demo data (700 Animal-Shape training images)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.config import ConfigError, load_config
from cnnlab.experiment import build_experiment
from cnnlab.lrfind import lr_find, rates, smooth, suggest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
SMALL = ["data.max_per_class=100"]  # 1,000 images: 700 train (6 batches of 128), as a real demo run draws them


def _snapshot(exp):
    return ({k: v.detach().clone() for k, v in exp.model.state_dict().items()},
            [p.requires_grad for p in exp.model.parameters()], exp.model.training,
            json.dumps({k: v for k, v in exp.optimizer.state_dict().items() if k != "state"}, default=str),
            len(exp.optimizer.state), exp.data.train.generator.get_state().clone())


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """One range test of the demo's model (40 steps: the loader cycles ~7 times), with its experiment."""
    exp = build_experiment(load_config(DEMO, SMALL))
    before = _snapshot(exp)
    out = tmp_path_factory.mktemp("lrfind") / "demo"
    result = lr_find(experiment=exp, steps=40, out=out, progress=False)
    return exp, before, result, out


def test_the_curve_falls_then_rises_and_the_suggestion_is_sane(found):
    _, _, r, out = found
    rows = list(csv.DictReader(open(out / "lr_find.csv")))
    lr = np.array([float(x["lr"]) for x in rows])
    raw = np.array([float(x["loss"]) for x in rows])
    sm = np.array([float(x["smoothed_loss"]) for x in rows])
    assert lr[0] == pytest.approx(1e-7) and np.all(np.diff(np.log(lr)) == pytest.approx(np.log(1e8) / 39))
    # it trained: the raw loss of a fresh 10-class net (≈ ln 10) fell well below it before the rate got too high
    assert raw[0] == pytest.approx(math.log(10), abs=0.3)
    assert np.nanmin(raw) < raw[0] - 0.5
    assert sm == pytest.approx(smooth(raw, 0.98), rel=1e-12)  # the EMA, bias-corrected
    i_min = int(np.argmin(sm))
    assert sm[i_min] < sm[0] - 0.1                       # the smoothed loss falls below its first value …
    assert 0 < i_min < len(sm) - 1 and sm[-1] > sm[i_min]  # … and then rises again
    assert r["stopped_early"] and "exceeded 4 × its minimum" in r["stopped_early"]  # Adam at rates ≈ 1 diverges
    assert len(rows) == r["steps_taken"] < 40
    assert [int(x["step"]) for x in rows] == list(range(1, len(rows) + 1))
    assert r["min_loss_lr"] == pytest.approx(lr[i_min]) and r["min_loss_step"] == i_min + 1
    # the suggestion: inside the range, before the minimum, where Adam trains this net (the demo uses 3e-3)
    s = r["suggested_lr"]
    assert 1e-7 < s < 10 and 1e-5 <= s <= 1 and s <= r["min_loss_lr"]
    assert 3e-4 <= s <= 3e-2
    assert r["rule"] == "steepest" and "steepest descent" in r["rule_description"]
    assert r["override"] == f"optim.lr={s:.1e}"


def test_weights_optimizer_and_generators_are_restored(found):
    exp, before, _, _ = found
    after = _snapshot(exp)
    weights0, weights1 = before[0], after[0]
    assert weights0.keys() == weights1.keys()
    for k in weights0:  # every parameter and batch-norm buffer, bit for bit
        assert torch.equal(weights0[k], weights1[k]), k
    assert after[1:5] == before[1:5]  # requires_grad, train/eval mode, optimiser groups (rates), no Adam moments
    assert torch.equal(after[5], before[5])  # the shuffling generator: a later fit draws the same order


def test_the_files(found):
    _, _, r, out = found
    assert {p.name for p in out.iterdir()} == {"lr_find.csv", "lr_find.json", "lr_find.png"}
    assert r["csv"] == str(out / "lr_find.csv") and r["png"] == str(out / "lr_find.png")
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved == {k: v for k, v in r.items() if k not in ("csv", "json", "png")}
    assert saved["settings"] == {"start_lr": 1e-7, "end_lr": 10.0, "steps": 40, "diverge": 4.0, "smoothing": 0.98,
                                 "skip_begin": 10 if saved["steps_taken"] >= 50 else saved["steps_taken"] // 5,
                                 "param_group_lr_scales": [1.0]}
    with Image.open(out / "lr_find.png") as im:
        im.verify()
    with Image.open(out / "lr_find.png") as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 250
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # drawn, not blank


def test_param_groups_keep_their_ratio(tmp_path):
    """optim.backbone_lr_scale: the backbone's rate stays 0.1 × the head's at every step."""
    exp = build_experiment(load_config(DEMO, ["data.max_per_class=20", "optim.backbone_lr_scale=0.1"]))
    assert len(exp.optimizer.param_groups) == 2
    configured = [g["lr"] for g in exp.optimizer.param_groups]
    seen = []
    hook = exp.optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    try:
        r = lr_find(experiment=exp, start_lr=1e-5, end_lr=1e-3, steps=12, out=tmp_path, progress=False)
    finally:
        hook.remove()
    assert r["stopped_early"] is None and r["steps_taken"] == 12 and len(seen) == 11  # no update after the last
    assert [h for _, h in seen] == pytest.approx(list(rates(1e-5, 1e-3, 12)[:11]))
    assert all(b == pytest.approx(0.1 * h) for b, h in seen)
    assert r["settings"]["param_group_lr_scales"] == [0.1, 1.0]
    assert [g["lr"] for g in exp.optimizer.param_groups] == configured  # the configured rates are back


def test_smoothing_and_the_rule_on_known_curves():
    assert smooth([2.0, 2.0, 2.0], 0.98) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    lrs = rates(1e-6, 1.0, 61)
    x = np.log10(lrs)
    curve = 2 - np.tanh(x + 3) + np.where(x > -1, 50 * (x + 1) ** 2, 0)  # steepest at 1e-3, minimum near 1e-1
    i, m = suggest(lrs, curve)
    assert lrs[i] == pytest.approx(1e-3) and 1e-2 < lrs[m] < 1
    assert suggest(lrs, np.full(61, 2.0)) == (None, 0)  # a flat curve: no suggestion
    assert suggest(lrs, np.linspace(2, 3, 61))[0] is None  # a rising one: none either


@pytest.mark.parametrize("kw, needle", [({"start_lr": 0}, "start_lr=0"), ({"start_lr": -1e-3}, "start_lr=-0.001"),
                                        ({"start_lr": 1.0, "end_lr": 0.1}, "end_lr=0.1"),
                                        ({"end_lr": float("nan")}, "end_lr=nan"), ({"steps": 9}, "steps=9")])
def test_bad_settings_raise_before_any_work(tmp_path, kw, needle):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        lr_find(tmp_path / "no-such-config.yaml", out=out, progress=False, **kw)  # checked before the config
    assert not out.exists()


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cnnlab", "lr-find", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_cli(tmp_path):
    out = tmp_path / "lrf"
    p = _cli("recipes/demo.yaml", "data.max_per_class=100", "--steps", "30", "--out", out, cwd=REPO)
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "lr_find.json").read_text())
    assert f"suggested learning rate: {r['suggested_lr']:.2e}" in p.stdout
    assert f"rate at the minimum smoothed loss: {r['min_loss_lr']:.2e}" in p.stdout
    assert f"to use it: optim.lr={r['suggested_lr']:.1e}" in p.stdout
    assert str(out / "lr_find.png") in p.stdout and str(out / "lr_find.csv") in p.stdout
    assert r["settings"]["steps"] == 30 and r["config"]["name"] == "demo"
    assert 1e-5 <= r["suggested_lr"] <= 1
    rows = (out / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and len(rows) == 1 + r["steps_taken"]


@pytest.mark.parametrize("args, flag", [(["--start", "1", "--end", "0.1"], "--end"), (["--start", "0"], "--start"),
                                        (["--steps", "5"], "--steps")])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, flag):
    out = tmp_path / "lrf"
    p = _cli("recipes/demo.yaml", *args, "--out", out, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.startswith("cnnlab: error: " + flag + "=") and p.stdout == ""
    assert not out.exists()


def test_the_loss_scaler_is_restored_too(tmp_path):
    """fp16's loss scaler (here forced on the CPU, as test_train does) steps through the precision and keeps its
    scale: the test's overflows and growth must not change what a later fit starts with."""
    from cnnlab.training.runtime import Precision

    exp = build_experiment(load_config(DEMO, ["data.max_per_class=20", "train.precision=32"]))
    exp.runtime.precision = Precision("32", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0,
                                                                                growth_interval=2))
    state = exp.runtime.precision.state_dict()
    weights = {k: v.clone() for k, v in exp.model.state_dict().items()}
    r = lr_find(experiment=exp, start_lr=1e-6, end_lr=1.0, steps=12, out=tmp_path, progress=False)
    assert r["steps_taken"] >= 10 and r["config"]["precision"] == "32"
    assert exp.runtime.precision.state_dict() == state
    assert all(torch.equal(v, exp.model.state_dict()[k]) for k, v in weights.items())
