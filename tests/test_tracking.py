"""Tracking (cnnlab.tracking): MLflow and TensorBoard fed from the run folder, real stores, no mocks.

One tiny training with track.mlflow (a SQLite store) and track.tensorboard, read back with MlflowClient and
TensorBoard's EventAccumulator; a tracker pointing at a dead server (the run still finishes, one warning
line, the error in RUN/tracking.json); a 4-run study uploaded by run_study's hook and again by `cnnlab track`
(a parent run with 4 children); the config keys' checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="pip install 'cnnlab[mlflow]'")
pytest.importorskip("tensorboard", reason="pip install 'cnnlab[tensorboard]'")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import cnnlab  # noqa: E402
from cnnlab import cli  # noqa: E402
from cnnlab.config import RESULT_NEUTRAL, ConfigError, config_differences, load_config  # noqa: E402
from cnnlab.runs import read_history, read_json  # noqa: E402
from cnnlab.tracking import default_store, group_folder  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["data.max_per_class=20", "train.epochs=2", "data.augment=false", "train.progress=none"]


def _only_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    return client, runs


# --------------------------------------------------------------------------- one run, both trackers

@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = cnnlab.train(RECIPES / "demo.yaml", TINY + [f"track.mlflow={uri}", "track.tensorboard=true",
                                                      "track.experiment=cnnlab-tests"],
                       out=root / "run", quiet=True, report=True)
    return run, uri


def test_mlflow_holds_params_metrics_tags_and_artifacts(tracked_run):
    run, uri = tracked_run
    client, runs = _only_run(uri, "cnnlab-tests")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["optim.lr"] == "0.003" and r.data.params["model.name"] == "harahap-cnn"
    assert r.data.params["data.max_per_class"] == "20" and r.data.params["train.early_stopping"] == "null"
    assert not any(k.startswith("track.") for k in r.data.params), "the store's URI is no parameter"
    metrics = read_json(run.path / "metrics.json")
    history = read_history(run.path / "history.csv")
    val = client.get_metric_history(r.info.run_id, "val_accuracy")
    assert sorted(m.step for m in val) == [1, 2]
    assert [m.value for m in sorted(val, key=lambda m: m.step)] == [row["val_accuracy"] for row in history]
    assert len(client.get_metric_history(r.info.run_id, "loss")) == 2
    assert r.data.metrics["test_accuracy"] == metrics["accuracy"]
    assert r.data.metrics["test_f1_macro"] == metrics["f1_macro"]
    assert r.data.metrics["test_accuracy_ci95_low"] == metrics["accuracy_ci95"][0]
    assert r.data.metrics["test_accuracy_ci95_high"] == metrics["accuracy_ci95"][1]
    assert r.data.tags["cnnlab.evaluated_on"] == "test" and r.data.tags["cnnlab.model"] == "harahap-cnn"
    assert r.data.tags["cnnlab.run_dir"] == str(run.path.resolve()) and r.data.tags["cnnlab.version"]
    assert r.info.run_name == "run"
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.csv", "env.json", "report.html", "model.safetensors",
            "plots"} <= artifacts
    assert any(a.path.endswith("confusion.png") for a in client.list_artifacts(r.info.run_id, "plots"))
    # a SQLite store's artifacts lie next to it, never in the current folder
    assert (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").is_dir()
    rec = read_json(run.path / "tracking.json")
    assert rec["mlflow"][-1]["run_id"] == r.info.run_id and "error" not in rec["mlflow"][-1]


def test_tensorboard_holds_scalars_image_and_hparams(tracked_run):
    run, _ = tracked_run
    acc = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    history = read_history(run.path / "history.csv")
    assert [e.value for e in acc.Scalars("val/accuracy")] == pytest.approx([r["val_accuracy"] for r in history])
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(run.metrics["accuracy"])
    assert tags["images"] == ["confusion_matrix"]
    image = acc.Images("confusion_matrix")[0]
    assert image.width > 100 and image.height > 100
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)


def test_cnnlab_track_again_reuses_the_uploaded_run(tracked_run, capsys):
    """The default store of a run is sqlite:///<its parent>/mlflow.db: the same store as the fixture's, so the
    earlier upload is found (tracking.json) and reused instead of duplicated."""
    run, uri = tracked_run
    assert default_store(run.path) == uri
    assert cli.main(["track", str(run.path), "--mlflow", "default", "--experiment", "cnnlab-tests"]) == 0
    assert "uploaded before" in capsys.readouterr().out
    _, runs = _only_run(uri, "cnnlab-tests")
    assert len(runs) == 1


def test_cnnlab_track_refuses_bad_folders_and_missing_extras(tracked_run, tmp_path, capsys, monkeypatch):
    run, _ = tracked_run
    assert cli.main(["track", str(tmp_path), "--mlflow", "default"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run folder" in err[0] and "plan.json" in err[0]
    assert cli.main(["track", str(run.path)]) == 2
    assert "--mlflow" in capsys.readouterr().err
    assert cli.main(["track", str(run.path), "--mlflow", str(tmp_path / "mlruns")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file path" in err[0] and "sqlite:///" in err[0]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed: its import fails
    assert cli.main(["track", str(run.path), "--mlflow", "default"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'cnnlab[mlflow]'" in err[0]


# --------------------------------------------------------------------------- a tracker that fails

def test_a_dead_tracking_server_never_loses_the_run(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    run = cnnlab.train(RECIPES / "demo.yaml", ["data.max_per_class=10", "train.epochs=1", "train.progress=none",
                                               "track.mlflow=http://127.0.0.1:9"],
                       out=tmp_path / "run", quiet=True, report=False)
    assert (run.path / "metrics.json").is_file() and run.metrics["accuracy"] >= 0
    err = capfd.readouterr().err
    warned = [line for line in err.splitlines() if "tracking failed" in line]
    assert len(warned) == 1, err
    assert "127.0.0.1:9" in warned[0] and "cnnlab track" in warned[0] and "Traceback" not in err
    rec = read_json(run.path / "tracking.json")
    entry = rec["mlflow"][-1]
    assert entry["uri"] == "http://127.0.0.1:9" and "run_id" not in entry
    assert "Connection refused" in entry["error"] or "127.0.0.1" in entry["error"]


# --------------------------------------------------------------------------- a study

STUDY = """name: mini-study
base: {recipes}/alkhairi2023-mlp.yaml
overrides:
  data.source: animal-shapes
  data.max_per_class: 10
  data.image_size: 28
  data.channels: 1
  data.expand: 0
  data.test_fraction: 0.3
  train.epochs: 1
  train.early_stopping: null
variants:
  slow: {{optim.lr: 0.01}}
  fast: {{optim.lr: 0.05}}
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def tracked_study(tmp_path_factory):
    from cnnlab.study.runner import run_study

    root = tmp_path_factory.mktemp("study")
    spec = root / "mini-study.yaml"
    spec.write_text(STUDY.format(recipes=RECIPES), encoding="utf-8")
    study_dir = run_study(spec, jobs=2, out=root / "mini-study", quiet=True,
                          overrides=["track.mlflow=default", "track.tensorboard=true"])
    return study_dir


def _parent_and_children(uri: str, experiment: str):
    client, runs = _only_run(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("cnnlab.kind") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def test_run_study_uploads_a_parent_with_every_run_as_child(tracked_study):
    """track.* in the study's settings: the runs themselves upload nothing (each belongs to the study); the
    study uploads once, into the default store next to the study folder."""
    uri = f"sqlite:///{tracked_study.parent / 'mlflow.db'}"
    assert default_store(tracked_study) == uri
    run_dir = tracked_study / "runs" / "slow" / "seed-0"
    assert group_folder(run_dir) == tracked_study
    client, parent, children = _parent_and_children(uri, "mini-study")
    assert {e.name for e in client.search_experiments()} <= {"Default", "mini-study", "again"}  # none per run
    assert sorted(c.info.run_name for c in children) == ["fast/seed-0", "fast/seed-1", "slow/seed-0",
                                                         "slow/seed-1"]
    assert {c.data.tags["cnnlab.variant"] for c in children} == {"slow", "fast"}
    summary = read_json(tracked_study / "summary.json")
    slow = next(v for v in summary["variants"] if v["name"] == "slow")
    assert parent.data.metrics["slow/accuracy_mean"] == pytest.approx(slow["metrics"]["accuracy"]["mean"])
    assert {"summary.json", "table.md", "table.csv", "report.html"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    child = next(c for c in children if c.info.run_name == "slow/seed-0")
    assert child.data.metrics["test_accuracy"] == read_json(run_dir / "metrics.json")["accuracy"]
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())


def test_cnnlab_track_uploads_a_study_made_earlier(tracked_study, capsys):
    uri = f"sqlite:///{tracked_study.parent / 'mlflow.db'}"
    assert cli.main(["track", str(tracked_study), "--mlflow", uri, "--experiment", "again"]) == 0
    assert "4 child run(s)" in capsys.readouterr().out
    _, parent, children = _parent_and_children(uri, "again")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    # once more: the same parent and children (tracking.json remembers them), nothing duplicated
    assert cli.main(["track", str(tracked_study), "--mlflow", uri, "--experiment", "again"]) == 0
    _, again, children2 = _parent_and_children(uri, "again")
    assert again.info.run_id == parent.info.run_id
    assert sorted(c.info.run_id for c in children2) == sorted(c.info.run_id for c in children)
    rec = json.loads((tracked_study / "tracking.json").read_text(encoding="utf-8"))
    assert {e["experiment"] for e in rec["mlflow"]} == {"mini-study", "again"}


# --------------------------------------------------------------------------- the config keys

def test_track_keys_default_off_and_validate(tmp_path, monkeypatch):
    cfg = load_config()
    assert (cfg.track.mlflow, cfg.track.experiment, cfg.track.tensorboard) == (None, None, False)
    assert load_config(None, {"track.mlflow": True}).track.mlflow == "default"
    assert load_config(None, ["track.mlflow=true"]).track.mlflow == "default"
    assert load_config(None, {"track.mlflow": False}).track.mlflow is None
    assert load_config(None, ["track.mlflow=http://127.0.0.1:5000"]).track.mlflow == "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["track.mlflow=sqlite:///db/m.db"]).track.mlflow == \
        f"sqlite:///{tmp_path.resolve() / 'db' / 'm.db'}"
    for value, words in [("mlruns", "file path"), (f"file://{tmp_path}", "file path"),
                         ("ftp://host/x", "unknown tracking URI scheme"), ("http://", "names no host"),
                         ("sqlite:///:memory:", "needs a file"), ("", "empty")]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, {"track.mlflow": value})
    with pytest.raises(ConfigError, match="track.tensorboard: expected true/false"):
        load_config(None, {"track.tensorboard": "yes"})
    with pytest.raises(ConfigError, match="track.experiment"):
        load_config(None, {"track.experiment": "  "})
    with pytest.raises(ConfigError, match="unknown key track.mlfow.*did you mean track.mlflow"):
        load_config(None, {"track.mlfow": "default"})


def test_track_keys_never_make_a_run_stale():
    assert {"track.mlflow", "track.experiment", "track.tensorboard"} <= RESULT_NEUTRAL
    off = load_config()
    on = load_config(None, ["track.mlflow=default", "track.tensorboard=true", "track.experiment=x"])
    assert config_differences(off, on, ignore=RESULT_NEUTRAL) == []
