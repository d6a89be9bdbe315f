"""The run folder contract, load_run / evaluate / predict, and the command line end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import cnnlab
from cnnlab import cli
from cnnlab.api import evaluate, predict  # not cnnlab.*: see test_package_api_names_stay_functions
from cnnlab.config import dump_config, load_config
from cnnlab.runs import RunError

from conftest import TINY_RUN_OVERRIDES, fit_run

ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run_data(tiny_run):
    """The tiny run's dataset, decoded exactly as training decoded it."""
    return cnnlab.load_source("animal-shapes", max_per_class=TINY_RUN_OVERRIDES["data.max_per_class"], seed=0)


@pytest.fixture(scope="module")
def test_pngs(tiny_run, run_data, tmp_path_factory):
    """The tiny run's test images as 28×28 grayscale PNG files, with their true labels."""
    d = tmp_path_factory.mktemp("test-pngs")
    files, labels = [], []
    for i in _json(tiny_run.path / "split.json")["test"]:
        p = d / f"img_{i:05d}.png"
        Image.fromarray(run_data.images[i, 0].numpy(), "L").save(p)
        files.append(p)
        labels.append(int(run_data.labels[i]))
    return files, labels


# --------------------------------------------------------------------------- run folder

def test_run_folder_files(tiny_run):
    names = {p.name for p in tiny_run.path.iterdir()}
    assert {"config.yaml", "split.json", "history.csv", "metrics.json", "model.safetensors", "env.json"} <= names
    assert not any(n.endswith(".tmp") for n in names)


def test_config_yaml_is_the_resolved_config(tiny_run):
    text = (tiny_run.path / "config.yaml").read_text(encoding="utf-8")
    tree = yaml.safe_load(text)
    assert tree["data"]["max_per_class"] == 30 and tree["train"]["epochs"] == 2
    assert tree["optim"]["lr"] == 0.001 and tree["model"]["name"] == "harahap-cnn"  # defaults written out
    assert load_config(tiny_run.path / "config.yaml") == tiny_run.config
    assert text == dump_config(tiny_run.config)


def test_split_json(tiny_run, run_data):
    s = _json(tiny_run.path / "split.json")
    train, val, test = set(s["train"]), set(s["val"]), set(s["test"])
    # 30 images per class; 15 % of 30 = 4.5 → 4 per class for validation and for test
    assert (len(train), len(val), len(test)) == (220, 40, 40)
    assert s["counts"]["val"] == s["counts"]["test"] == [4] * 10
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(300))
    assert s["classes"] == ANIMALS
    assert s["counts"]["test"] == [int((run_data.labels[s["test"]] == c).sum()) for c in range(10)]
    assert s["seed"] == 0 and s["method"] == "stratified"


def test_history_csv(tiny_run):
    with open(tiny_run.path / "history.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert reader.fieldnames[:7] == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for k in HISTORY_COLUMNS:
            v = float(r[k])
            assert np.isfinite(v), k
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["val_accuracy"]) <= 1
        assert float(r["lr"]) == pytest.approx(0.001)
        assert float(r["seconds"]) > 0


def test_metrics_json(tiny_run):
    m = _json(tiny_run.path / "metrics.json")
    for key in ("loss", "accuracy", "accuracy_ci95", "precision_macro", "recall_macro", "f1_macro",
                "precision_weighted", "recall_weighted", "f1_weighted", "per_class", "confusion_matrix",
                "best_epoch", "chance", "classes", "evaluated_on", "n"):
        assert key in m, key
    assert m["n"] == 40 and m["evaluated_on"] == "test"
    lo, hi = m["accuracy_ci95"]
    assert lo <= m["accuracy"] <= hi
    assert m["best_epoch"] in (1, 2)
    assert m["classes"] == ANIMALS and list(m["per_class"]) == ANIMALS
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 40
    assert cm.sum(1).tolist() == [4] * 10  # rows: the true classes
    assert np.trace(cm) / 40 == pytest.approx(m["accuracy"])
    assert m["chance"]["accuracy"] == pytest.approx(0.1)  # balanced split: every class 4× in the test part
    assert m == tiny_run.metrics or json.loads(json.dumps(tiny_run.metrics)) == m


def test_model_safetensors_is_pickle_free_with_json_metadata(tiny_run):
    path = tiny_run.path / "model.safetensors"
    raw = path.read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # no zip / pickle
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: an 8-byte length then a JSON header
    assert "backbone.0.weight" in header
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["cnnlab"])
        assert f.get_tensor("backbone.0.weight").shape == (32, 1, 5, 5)
    assert meta["classes"] == ANIMALS
    assert meta["model"] == "harahap-cnn" and meta["num_classes"] == 10
    assert (meta["in_channels"], meta["image_size"]) == (1, 28)
    assert len(meta["mean"]) == len(meta["std"]) == 1


def test_env_json(tiny_run):
    env = _json(tiny_run.path / "env.json")
    assert env["torch"] == torch.__version__
    import numpy
    from importlib.metadata import version

    assert env["numpy"] == numpy.__version__ and env["torchvision"] == version("torchvision")
    assert env["seed"] == 0
    assert isinstance(env["threads"], int) and env["threads"] >= 1
    assert env["device"] == "cpu"
    assert env["cnnlab"] == cnnlab.__version__


def test_load_run_gives_back_what_train_returned(tiny_run):
    run = cnnlab.load_run(tiny_run.path)
    assert run.config == tiny_run.config
    assert run.history == tiny_run.history  # floats written with repr: exact
    assert run.metrics == json.loads(json.dumps(tiny_run.metrics))
    assert run.env["seed"] == 0
    assert run.classes == ANIMALS
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, tiny_run.model.state_dict()[k]), k
    assert "accuracy=" in repr(run)


def test_load_run_on_a_non_run(tmp_path, capsys):
    with pytest.raises(RunError, match="not a run folder"):
        cnnlab.load_run(tmp_path)
    assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 2  # resume says it as eval does
    assert "nope is not a run folder (no config.yaml); nothing to resume" in capsys.readouterr().err


def test_evaluate_reproduces_metrics_exactly(tiny_run):
    m = evaluate(tiny_run.path)
    saved = _json(tiny_run.path / "metrics.json")
    assert m["accuracy"] == saved["accuracy"]
    assert m["confusion_matrix"] == saved["confusion_matrix"]
    assert m["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    assert m["f1_macro"] == saved["f1_macro"]
    assert m["chance"] == saved["chance"]
    assert m["evaluated_on"] == "test"


def test_evaluate_on_a_folder_of_known_classes(tiny_run, test_pngs, tmp_path):
    files, labels = test_pngs
    for f, y in zip(files[:12], labels[:12]):
        dest = tmp_path / "eval" / ANIMALS[y] / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    m = evaluate(tiny_run.path, data=f"folder:{tmp_path / 'eval'}")
    assert m["n"] == 12
    preds = predict(tiny_run, files[:12], top_k=1)
    right = sum(p["top"][0]["class"] == ANIMALS[y] for p, y in zip(preds, labels[:12]))
    assert m["accuracy"] == pytest.approx(right / 12)
    assert m["overlap_with_training"] == 0 and m["caution"] is None  # its test images only
    assert m["chance"]["majority_of"] == "these images"


def test_evaluate_on_other_data_says_how_many_are_the_runs_training_images(tiny_run, run_data, test_pngs,
                                                                          tmp_path, capsys):
    """Scoring a folder that holds some of the run's training images is no test of them: evaluation counts
    them (the same pixels as a training image) and says so, in metrics and in `cnnlab eval`'s table."""
    files, labels = test_pngs
    for f, y in zip(files[:5], labels[:5]):
        dest = tmp_path / "eval" / ANIMALS[y] / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    for i in _json(tiny_run.path / "split.json")["train"][:3]:
        dest = tmp_path / "eval" / ANIMALS[int(run_data.labels[i])] / f"train_{i:05d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(run_data.images[i, 0].numpy(), "L").save(dest)
    m = evaluate(tiny_run.path, data=f"folder:{tmp_path / 'eval'}")
    assert m["n"] == 8 and m["overlap_with_training"] == 3
    assert m["caution"].startswith("3 of these 8 images are the run's own training images")
    assert cli.main(["eval", str(tiny_run.path), "--data", f"folder:{tmp_path / 'eval'}"]) == 0
    assert "caution: 3 of these 8 images are the run's own training images" in capsys.readouterr().out


# --------------------------------------------------------------------------- predict

def test_package_api_names_stay_functions(tiny_run, test_pngs, tmp_path):
    """README: `run = cnnlab.train(...)`, `cnnlab.predict(run, files)`. The package also holds a
    subpackage `cnnlab/train/` and a module `cnnlab/predict.py`; importing them (which training
    and Run.predict do) binds `cnnlab.train` / `cnnlab.predict` to those modules, so the API
    function works once and then raises "TypeError: 'module' object is not callable"."""
    files, _ = test_pngs
    first = cnnlab.load_run(tiny_run.path).predict(files[:1])  # imports cnnlab.predict (module)
    assert "top" in first[0]
    assert callable(cnnlab.predict), f"cnnlab.predict is now {cnnlab.predict!r}"
    assert cnnlab.predict(tiny_run, files[:1])[0]["top"] == first[0]["top"]
    over = {"data.max_per_class": 4, "data.image_size": 14, "train.epochs": 1}
    for i in range(2):  # the second call is the one that breaks
        assert callable(cnnlab.train), f"cnnlab.train is now {cnnlab.train!r}"
        run = cnnlab.train(None, over, out=tmp_path / f"r{i}", quiet=True)
        assert (run.path / "metrics.json").is_file()
    assert callable(cnnlab.evaluate)
    assert cnnlab.evaluate(run.path)["accuracy"] == run.metrics["accuracy"]


def test_predict_png_files(tiny_run, test_pngs):
    files, labels = test_pngs
    res = predict(tiny_run.path, files, top_k=3)
    assert [r["file"] for r in res] == [str(f) for f in files]
    for r in res:
        assert "error" not in r
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3
        assert probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-5
        assert {t["class"] for t in r["top"]} <= set(ANIMALS) and len({t["class"] for t in r["top"]}) == 3
    # the PNGs hold the exact test pixels: top-1 accuracy equals metrics.json's test accuracy
    right = sum(r["top"][0]["class"] == ANIMALS[y] for r, y in zip(res, labels))
    assert right / len(labels) == pytest.approx(tiny_run.metrics["accuracy"])


def test_predict_all_classes_sums_to_one(tiny_run, test_pngs):
    files, _ = test_pngs
    res = predict(tiny_run, files[:2], top_k=50)
    for r in res:
        assert len(r["top"]) == 10
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_bad_files_give_error_entries(tiny_run, test_pngs, tmp_path):
    files, _ = test_pngs
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    res = predict(tiny_run, [files[0], corrupt, empty, missing, files[1]], top_k=2)
    assert [r["file"] for r in res] == [str(p) for p in (files[0], corrupt, empty, missing, files[1])]
    assert "top" in res[0] and "top" in res[4]
    for r in res[1:4]:
        assert r["error"] and "top" not in r


def test_predict_searches_folders_and_converts_rgb(tiny_run, test_pngs, tmp_path):
    files, _ = test_pngs
    (tmp_path / "deep" / "er").mkdir(parents=True)
    img = Image.open(files[0]).convert("RGB").resize((56, 56))
    img.save(tmp_path / "deep" / "er" / "big.jpg")
    (tmp_path / "deep" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "deep" / "notes.txt").write_text("x")
    res = predict(tiny_run, [tmp_path / "deep"], top_k=1)
    assert len(res) == 1 and res[0]["file"].endswith("big.jpg") and "top" in res[0]


# --------------------------------------------------------------------------- command line

def _cli(cnnlab_bin, *args, cwd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CNNLAB_DEBUG", None)
    return subprocess.run([str(cnnlab_bin), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def cli_run(cnnlab_bin, tmp_path_factory):
    """`cnnlab train` with overrides and --out, run as a user would (stdout is a pipe, not a TTY)."""
    cwd = tmp_path_factory.mktemp("cli")
    out = cwd / "myrun"
    proc = _cli(cnnlab_bin, "train", "-", "data.max_per_class=8", "train.epochs=2", "data.batch_size=16",
                "optim.lr=0.002", "name=clitest", "--out", out, cwd=cwd)
    return proc, out, cwd


def test_cli_train(cli_run):
    proc, out, cwd = cli_run
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(l.startswith("Epoch 1/2") for l in lines), proc.stdout
    assert any(l.startswith("Epoch 2/2") for l in lines)
    assert "\r" not in proc.stdout and "\x1b[" not in proc.stdout  # no progress bar on a pipe
    assert f"Run folder: {out}" in proc.stdout
    assert "Traceback" not in proc.stderr
    run = cnnlab.load_run(out)
    assert run.config.optim.lr == 0.002 and run.config.name == "clitest"
    assert len(run.history) == 2
    assert not (cwd / "runs").exists()  # --out means exactly there


def test_cli_eval_json_reproduces_metrics(cnnlab_bin, cli_run):
    _, out, cwd = cli_run
    proc = _cli(cnnlab_bin, "eval", out, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["accuracy"] == _json(out / "metrics.json")["accuracy"]


def test_cli_eval_table(cli_run, capsys):
    _, out, _ = cli_run
    assert cli.main(["eval", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "macro avg" in text and "weighted avg" in text and "Wilson" in text


def test_the_chance_level_printed_is_the_one_tested(capsys):
    """A test part where the training split's majority class never appears: the majority rate is 0, but the
    binomial test compares with max(that, 1/classes) — the level `eval` prints (and the training summary)."""
    from cnnlab.metrics import classification_metrics

    classes = [f"c{i}" for i in range(12)]
    m = classification_metrics([1, 2, 3, 4, 1, 2], [1, 2, 3, 0, 0, 0], classes, loss=1.0, train_labels=[0, 0, 1])
    m["evaluated_on"] = "test"
    assert m["chance"]["accuracy"] == 0.0
    cli._print_metrics(m)
    text = capsys.readouterr().out
    assert "chance level 0.0833" in text and "the training split's most frequent class 'c0' (0.0000 of these images) and 1/12" in text


def test_cli_predict_json(cnnlab_bin, cli_run, test_pngs, tmp_path):
    _, out, cwd = cli_run
    files, _ = test_pngs
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = _cli(cnnlab_bin, "predict", out, files[0], bad, "--json", "-k", "2", cwd=cwd)
    assert proc.returncode == 1  # a file could not be read: reported, not fatal
    res = json.loads(proc.stdout)
    assert len(res) == 2
    assert len(res[0]["top"]) == 2 and res[0]["top"][0]["class"] in ANIMALS
    assert "error" in res[1]
    assert "Traceback" not in proc.stderr


def test_cli_predict_table(cli_run, test_pngs, capsys):
    _, out, _ = cli_run
    files, _ = test_pngs
    assert cli.main(["predict", str(out), str(files[0]), "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(files[0])[:20]) and any(a in line for a in ANIMALS)


def test_cli_datasets_via_python_m(tmp_path):
    """`python -m cnnlab` is the same program as the console script."""
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "datasets"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("animal-shapes", "animal-shapes-5", "random", "folder:"):
        assert name in proc.stdout


def test_cli_models(capsys):
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    for name in cnnlab.list_models():
        assert name in text


def test_cli_config_keys_and_resolved(capsys):
    assert cli.main(["config", "--keys"]) == 0
    text = capsys.readouterr().out
    for key in ("optim.lr", "data.image_size", "train.early_stopping", "schedule.name", "model.init"):
        assert key in text
    from cnnlab.config import describe_keys

    for line, (key, default, _) in zip(text.splitlines(), describe_keys()):  # key, default: separate columns
        assert line.split()[:2] == [key, default.split()[0]], line
    assert cli.main(["config", "-", "optim.lr=0.05", "model.hidden=[16]"]) == 0
    cfg = load_config(yaml.safe_load(capsys.readouterr().out))
    assert cfg.optim.lr == 0.05 and cfg.model.hidden == [16]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "datasets", "models", "config"])
def test_cli_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: cnnlab " + command)


@pytest.mark.parametrize("command", ["predict", "explain", "train"])
@pytest.mark.parametrize("k", ["0", "-2", "three"])
def test_cli_top_k_and_nproc_must_be_positive_whole_numbers(command, k, tmp_path, capsys):
    args = ([command, str(tmp_path / "no-run"), str(tmp_path / "a.png"), "--top-k", k] if command != "train" else
            [command, "-", "--out", str(tmp_path / "never"), "--nproc", k])
    with pytest.raises(SystemExit) as e:  # argparse's usage error, before any run folder is read or made
        cli.main(args)
    assert not (tmp_path / "never").exists()
    assert e.value.code == 2
    assert f"a whole number ≥ 1 is needed; got {k!r}" in capsys.readouterr().err


def test_cli_top_level_help_and_version(capsys):
    assert cli.main([]) == 0  # no command: the help, not a traceback
    text = capsys.readouterr().out
    for command in ("train", "eval", "predict", "datasets", "models", "config"):
        assert command in text
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and cnnlab.__version__ in capsys.readouterr().out


def test_cli_bad_key_is_one_line_exit_2_and_no_run_folder(cnnlab_bin, tmp_path):
    out = tmp_path / "never"
    proc = _cli(cnnlab_bin, "train", "-", "optim.lrr=0.1", "--out", out, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert "optim.lrr" in err and "did you mean optim.lr" in err
    assert not out.exists()
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_bad_value_and_missing_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "-", "optim.name=adma", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'adma'" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["train", "no-such-recipe.yaml"]) == 2
    assert "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_non_empty_out_folder(cnnlab_bin, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("precious", encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "metrics.json").write_text("{}", encoding="utf-8")
    before = _snapshot(out)
    proc = _cli(cnnlab_bin, "train", "-", "data.max_per_class=4", "train.epochs=1", "--out", out, cwd=tmp_path)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_train_api_refuses_a_non_empty_out_folder(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(RunError, match="not empty"):
        fit_run({"data.max_per_class": 4, "train.epochs": 1}, out=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_auto_named_runs_never_overwrite(tmp_path):
    over = {"data.max_per_class": 4, "train.epochs": 1, "name": "same"}
    a = fit_run(over, runs_root=tmp_path / "runs")
    b = fit_run(over, runs_root=tmp_path / "runs")
    assert a.path == tmp_path / "runs" / "same"
    assert b.path == tmp_path / "runs" / "same-2"
    assert (a.path / "metrics.json").is_file() and (b.path / "metrics.json").is_file()


# --------------------------------------------------------------------------- folders end to end

def _bad_files_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def test_train_on_a_folder_with_bad_files(image_folder, tmp_path):
    root = image_folder({"circle": 10, "square": 10, "star": 10}, size=16)
    (root / "star" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "square" / "zero.png").write_bytes(b"")
    (root / "circle" / ".DS_Store").write_bytes(b"junk")
    run = fit_run({"data.source": f"folder:{root}", "data.image_size": 16, "data.channels": 1,
                              "data.batch_size": 8, "train.epochs": 2, "data.val_fraction": 0.2,
                              "data.test_fraction": 0.2},
                       out=tmp_path / "run")
    bad = _bad_files_csv(run.path / "bad_files.csv")
    assert set(bad) == {os.path.join("star", "broken.jpg"), os.path.join("square", "zero.png")}
    assert all(bad.values())
    s = run.split
    assert s["classes"] == ["circle", "square", "star"]
    assert len(s["train_files"]) + len(s["val_files"]) + len(s["test_files"]) == 30
    assert s["counts"]["test"] == [2, 2, 2]
    assert all(f.split(os.sep)[0] in s["classes"] for f in s["test_files"])
    assert run.metrics["n"] == 6
    assert evaluate(run.path)["accuracy"] == run.metrics["accuracy"]


def test_train_respects_a_folder_split(tmp_path):
    from conftest import make_image_folder

    root = tmp_path / "ds"
    make_image_folder(root / "train", {"a": 8, "b": 8}, size=12, seed=1)
    make_image_folder(root / "valid", {"a": 2, "b": 2}, size=12, seed=2)
    make_image_folder(root / "test", {"a": 3, "b": 3}, size=12, seed=3)
    run = fit_run({"data.source": f"folder:{root}", "data.image_size": 12, "data.channels": 1,
                              "data.batch_size": 8, "train.epochs": 1}, out=tmp_path / "run")
    s = run.split
    assert s["method"] == "folder"
    for part, folder, n in (("train", "train", 16), ("val", "valid", 4), ("test", "test", 6)):
        assert len(s[part + "_files"]) == n
        assert all(f.startswith(folder + os.sep) for f in s[part + "_files"]), part
    assert run.metrics["n"] == 6


def test_a_folder_run_with_max_per_class_keeps_test_images_of_every_class_and_refuses_other_images(tmp_path):
    """data.max_per_class on a folder with its own train/ and test/: every class keeps test images (drawn from
    each part, not from the pool). When the images at split.json's positions are no longer the ones it names
    (here a test file renamed, so another image sorts into its place), evaluation refuses with the reason
    instead of scoring other images than the run's."""
    from cnnlab.data import DataError
    from conftest import make_image_folder

    root = tmp_path / "ds"
    make_image_folder(root / "train", {"a": 9, "b": 9, "c": 9}, size=12, seed=1)
    make_image_folder(root / "test", {"a": 3, "b": 3, "c": 3}, size=12, seed=2)
    run = fit_run({"data.source": f"folder:{root}", "data.image_size": 12, "data.channels": 1,
                   "data.max_per_class": 4, "data.batch_size": 8, "train.epochs": 1}, out=tmp_path / "run")
    s = run.split
    assert s["counts"]["test"] == [1, 1, 1] and sum(s["counts"]["train"]) + sum(s["counts"]["val"]) == 9
    assert evaluate(run.path)["accuracy"] == run.metrics["accuracy"]
    for name in ("a", "b", "c"):  # every test file renamed: the draw's positions now hold other files
        for f in sorted((root / "test" / name).iterdir()):
            f.rename(f.with_name("z" + f.name))
    with pytest.raises(DataError, match="split.json's test files are not the images at those positions"):
        evaluate(run.path)


def test_relative_folder_source_evaluates_from_elsewhere(tmp_path, monkeypatch):
    """config.yaml is 'the fully resolved config': a run trained on folder:imgs from one
    directory must re-evaluate from another (`cnnlab eval runs/x` from anywhere)."""
    from conftest import make_image_folder

    project = tmp_path / "project"
    make_image_folder(project / "imgs", {"a": 6, "b": 6}, size=12)
    monkeypatch.chdir(project)
    run = fit_run({"data.source": "folder:imgs", "data.image_size": 12, "data.channels": 1,
                              "train.epochs": 1, "data.val_fraction": 0.2, "data.test_fraction": 0.2},
                       out=project / "runs" / "rel")
    monkeypatch.chdir(tmp_path)
    m = evaluate(project / "runs" / "rel")
    assert m["accuracy"] == run.metrics["accuracy"]


@pytest.mark.parametrize("overrides", [
    {"data.max_per_class": 3},  # 15 % of 3 images rounds to 0: no val, no test part
    {"data.max_per_class": 10, "data.val_fraction": 0.0, "data.test_fraction": 0.0},
], ids=["tiny-classes", "no-held-out-part"])
def test_no_validation_or_test_part(tmp_path, overrides):
    """Either a clear error before anything is written, or a complete run folder — never a
    TypeError after training with a half-written run folder."""
    out = tmp_path / "run"
    try:
        run = fit_run(dict(overrides, **{"train.epochs": 1}), out=out)
    except ValueError as e:  # ConfigError / DataError / RunError are ValueErrors
        assert "val" in str(e) or "test" in str(e)
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    else:
        assert (run.path / "metrics.json").is_file() and (run.path / "model.safetensors").is_file()
