"""Studies: expansion of grids and variants, validation, and a tiny real study run twice."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from cnnlab.study import (METRIC_BOUNDS, StudyError, aggregate, expand_study, expand_variants, is_finished, load_study,
                            run_study)
from cnnlab.config import ConfigError
from conftest import write_spec as write_study  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny-study.yaml"


# --------------------------------------------------------------------------- expansion

def test_grid_expands_every_combination_with_readable_names():
    out = expand_variants(grid={"optim.name": ["adam", "rmsprop", "sgd"], "data.augment": [False, True]})
    assert len(out) == 6
    names = [n for n, _ in out]
    assert names[:2] == ["adam-augment-off", "adam-augment-on"]
    assert "sgd-augment-on" in names and len(set(names)) == 6
    assert dict(out)["rmsprop-augment-on"] == {"optim.name": "rmsprop", "data.augment": True}


def test_grid_number_values_and_sections_as_mappings():
    out = expand_variants(grid={"optim": {"lr": [0.1, 0.001]}})
    assert out == [("lr-0.1", {"optim.lr": 0.1}), ("lr-0.001", {"optim.lr": 0.001})]


def test_grid_names_spell_out_keys_when_short_names_collide():
    out = expand_variants(grid={"data.source": ["x", "x-y"], "model.name": ["y-z", "z"]})
    names = [n for n, _ in out]
    assert len(set(names)) == 4 and all("=" in n for n in names)
    assert all("/" not in n and " " not in n for n in names)


def test_named_variants_set_several_keys():
    out = expand_variants(variants={"cnn-adam": {"model.name": "alkhairi-cnn", "optim.name": "adam",
                                                 "optim.lr": 0.001},
                                    "mlp-sgd": {"model.name": "mlp", "optim.name": "sgd", "optim.lr": 0.1}})
    assert [n for n, _ in out] == ["cnn-adam", "mlp-sgd"]
    assert out[1][1] == {"model.name": "mlp", "optim.name": "sgd", "optim.lr": 0.1}


def test_variants_are_crossed_with_the_grid():
    out = expand_variants(grid={"data.augment": [False, True]},
                          variants={"cnn": {"model.name": "alkhairi-cnn"}, "mlp": {"model.name": "mlp"}})
    assert [n for n, _ in out] == ["cnn-augment-off", "cnn-augment-on", "mlp-augment-off", "mlp-augment-on"]
    assert dict(out)["mlp-augment-on"] == {"data.augment": True, "model.name": "mlp"}


def test_expand_study_times_seeds_and_defaults():
    runs = expand_study({"grid": {"optim.name": ["adam", "sgd"]}, "variants": {"a": {}, "b": {}},
                         "seeds": [0, 1, 2]})
    assert len(runs) == 2 * 2 * 3
    assert runs[:3] == [("a-adam", {"optim.name": "adam"}, 0), ("a-adam", {"optim.name": "adam"}, 1),
                        ("a-adam", {"optim.name": "adam"}, 2)]
    assert expand_study({}) == [("base", {}, 0)]


@pytest.mark.parametrize("study, words", [
    ({"grid": {"optim.name": []}}, ["optim.name", "no values"]),
    ({"grid": {"optim.name": "adam"}}, ["optim.name", "list"]),
    ({"variants": {"a/b": {}}}, ["'a/b'", "folder"]),
    ({"grid": {"optim.name": ["adam"]}, "variants": {"v": {"optim.name": "sgd"}}}, ["'v'", "grid axis"]),
    ({"seeds": [0, 0]}, ["seeds", "repeats"]),
    ({"seeds": []}, ["seeds"]),
])
def test_expansion_errors(study, words):
    with pytest.raises(StudyError) as e:
        expand_study(study)
    assert all(w in str(e.value) for w in words), str(e.value)


# --------------------------------------------------------------------------- validation of a study file

def test_load_study_resolves_base_relative_to_the_file_and_validates(tmp_path):
    p = write_study(tmp_path, "base: RECIPES/alkhairi2023-cnn.yaml\noverrides: {train: {epochs: 3}}\n"
                              "variants:\n  mlp: {base: RECIPES/alkhairi2023-mlp.yaml}\n  cnn: {}\nseeds: [1, 2]\n")
    s = load_study(p)
    assert s["name"] == "study" and s["seeds"] == [1, 2] and len(s["runs"]) == 4
    mlp, cnn = s["variants"]
    assert mlp["config"]["model"]["name"] == "mlp" and mlp["config"]["optim"]["lr"] == 0.1
    assert cnn["config"]["model"]["name"] == "alkhairi-cnn" and cnn["config"]["train"]["epochs"] == 3
    assert mlp["config"]["train"]["epochs"] == 3 and mlp["config"]["name"] == "mlp"


def test_unknown_config_key_fails_fast_naming_the_variant(tmp_path):
    p = write_study(tmp_path, "variants:\n  good: {optim.lr: 0.1}\n  typo: {optim.lrr: 0.1}\n")
    with pytest.raises(StudyError) as e:
        load_study(p)
    msg = str(e.value)
    assert "variant 'typo'" in msg and "optim.lrr" in msg and "did you mean optim.lr" in msg
    assert isinstance(e.value, ConfigError)  # the CLI prints it as one line


def test_a_typo_on_the_command_line_is_named_as_the_command_lines(tmp_path):
    """`cnnlab compare study.yaml train.epoch=2`: the mistake is the command line's, not the first variant's."""
    p = write_study(tmp_path, "variants:\n  good: {optim.lr: 0.1}\n")
    with pytest.raises(StudyError) as e:
        load_study(p, ["train.epoch=2"])
    msg = str(e.value)
    assert msg.startswith("the command line's overrides: unknown key train.epoch") and "variant" not in msg
    assert "did you mean train.epochs" in msg
    assert load_study(p, ["train.epochs=2"])["variants"][0]["config"]["train"]["epochs"] == 2
    # overrides that hold only with each variant's settings stay fine with a command-line override
    p = write_study(tmp_path, "overrides: {model.unfreeze_after: 2}\n"
                              "variants:\n  head: {model.freeze: backbone}\n", "together.yaml")
    assert load_study(p, ["train.epochs=3"])["variants"][0]["config"]["model"]["unfreeze_after"] == 2


def test_bad_value_names_the_grid_variant(tmp_path):
    p = write_study(tmp_path, "grid: {optim.name: [adam, adma]}\n")
    with pytest.raises(StudyError, match=r"variant 'adma'.*unknown optimizer 'adma'"):
        load_study(p)


def test_unknown_study_key_is_rejected(tmp_path):
    with pytest.raises(StudyError, match=r"unknown study key 'seed'.*did you mean 'seeds'"):
        load_study(write_study(tmp_path, "seed: [0, 1]\n"))


def test_pretrain_reference_must_exist(tmp_path):
    p = write_study(tmp_path, "pretrain:\n  other: {data.classes: [bear, bird]}\n"
                              "variants:\n  tuned: {model.weights: '@pretrain/othr'}\n")
    with pytest.raises(StudyError, match=r"variant 'tuned'.*no pretrain run named 'othr'"):
        load_study(p)
    ok = load_study(write_study(tmp_path, "pretrain:\n  other: {data.classes: [bear, bird]}\n"
                                          "variants:\n  tuned: {model.weights: '@pretrain/other'}\n", "ok.yaml"))
    assert ok["variants"][0]["needs"] == ["other"] and ok["pretrain"][0]["config"]["name"] == "pretrain-other"


def test_the_alkhairi_recipe_is_valid():
    s = load_study(RECIPES / "alkhairi2023.yaml")
    names = [v["name"] for v in s["variants"]]
    assert len(s["seeds"]) >= 3 and len(names) == 8
    assert {"cnn-adam-expand-2", "mlp-sgd-expand-0", "cnn-rmsprop-expand-2", "cnn-finetuned-expand-2"} <= set(names)
    pre = s["pretrain"][0]["config"]["data"]
    assert pre["source"] == "animal-shapes" and pre["classes"] == ["bear", "bird", "dog", "giraffe", "zebra"]


# --------------------------------------------------------------------------- a tiny real study

# tiny_study (conftest.py): recipes/tiny-study.yaml run once for the session with run_study(jobs=2)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def test_tiny_study_run_folders_and_summary(tiny_study):
    d = tiny_study
    for v in ("cnn-adam", "mlp-sgd"):
        for seed in (0, 1):
            run = d / "runs" / v / f"seed-{seed}"
            assert is_finished(run) and (run / "config.yaml").is_file() and (run / "predictions.csv").is_file()
            assert _metrics(run)["evaluated_on"] == "test"
    s = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    assert s["name"] == "tiny-study" and s["seeds"] == [0, 1] and s["averaging"] == "macro"
    assert Path(s["study_file"]).name == "tiny-study.yaml"
    assert [v["name"] for v in s["variants"]] == ["cnn-adam", "mlp-sgd"]
    for v in s["variants"]:
        assert v["runs"] == [f"runs/{v['name']}/seed-0", f"runs/{v['name']}/seed-1"] and v["failed"] == []
        ms = [_metrics(d / r) for r in v["runs"]]
        assert v["parameters"] == ms[0]["parameters"] and v["evaluated_on"] == "test" and v["n_eval"] == ms[0]["n"]
        for key in ("accuracy", "loss", "best_epoch", "precision_macro", "recall_macro", "f1_macro",
                    "training_seconds"):
            stat, vals = v["metrics"][key], [m[key] for m in ms]
            assert stat["values"] == pytest.approx(vals)
            assert stat["mean"] == pytest.approx(statistics.mean(vals))
            assert stat["sd"] == pytest.approx(statistics.stdev(vals))
            half = 12.706205 * statistics.stdev(vals) / 2 ** 0.5  # t(0.975, 1) · sd / √2
            lo, hi = METRIC_BOUNDS[key]  # the interval is clipped to the metric's possible range
            assert stat["ci95"] == pytest.approx([max(lo, statistics.mean(vals) - half),
                                                  min(hi, statistics.mean(vals) + half)], abs=1e-6)
    assert s["variants"][0]["model"] == "alkhairi-cnn" and s["variants"][1]["optimizer"] == "sgd"
    assert s["variants"][1]["lr"] == 0.05
    means = {v["name"]: v["metrics"]["accuracy"]["mean"] for v in s["variants"]}
    assert s["best"] == max(means, key=means.get)
    (cmp,) = s["comparisons"]
    other = next(n for n in means if n != s["best"])
    assert cmp["variant"] == other and cmp["against"] == s["best"] and cmp["seeds"] == 2
    assert cmp["difference_points"] == pytest.approx(100 * (means[other] - means[s["best"]]))
    assert cmp["n_pairs"] == 2 * s["variants"][0]["n_eval"]
    assert 0 <= cmp["mcnemar_p"] <= 1 and (cmp["ttest_p"] is None or 0 <= cmp["ttest_p"] <= 1)
    assert cmp["sentence"].startswith(other) and "McNemar" in cmp["sentence"]
    assert [c["variant"] for c in s["chance"]] == ["cnn-adam", "mlp-sgd"]
    for c in s["chance"]:
        assert c["chance"] == pytest.approx(0.1) and 0 <= c["p_value"] <= 1 and "chance 0.100" in c["sentence"]


def test_tiny_study_tables(tiny_study):
    md = (tiny_study / "table.md").read_text(encoding="utf-8")
    head = md.splitlines()[0]
    for col in ("Variant", "Model", "Optimiser", "Learning rate", "Test loss", "Best epoch", "Precision (macro)",
                "Recall (macro)", "F1 (macro)", "Accuracy (%)", "Parameters", "Training time (s)"):
        assert col in head
    assert "| cnn-adam | alkhairi-cnn | adam | 0.001 |" in md and " ± " in md
    with open(tiny_study / "table.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["Variant"] for r in rows] == ["cnn-adam", "mlp-sgd"] and "F1 (macro) mean" in rows[0]
    s = json.loads((tiny_study / "summary.json").read_text(encoding="utf-8"))
    assert float(rows[0]["Accuracy (%) mean"]) == pytest.approx(100 * s["variants"][0]["metrics"]["accuracy"]["mean"])
    tex = (tiny_study / "table.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}" in tex and r"Precision (macro)" in tex and r"Accuracy (\%)" in tex
    assert r"$\pm$" in tex and "±" not in tex.split("\n", 1)[1]


def test_rerun_skips_finished_runs_and_redoes_only_a_broken_one(tiny_study, capsys):
    runs = sorted(tiny_study.glob("runs/*/seed-*/metrics.json"))
    assert len(runs) == 4
    before = {p: p.stat().st_mtime_ns for p in runs}
    run_study(TINY, jobs=2, out=tiny_study)
    assert "4 already finished; 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs} == before

    broken = tiny_study / "runs" / "mlp-sgd" / "seed-1"
    resumed = tiny_study / "runs" / "cnn-adam" / "seed-0"
    expected = _metrics(resumed)["accuracy"]
    (resumed / "metrics.json").unlink()  # interrupted after its last checkpoint: resumed from it
    (broken / "metrics.json").unlink()  # interrupted before any checkpoint: redone from scratch
    (broken / "checkpoint.safetensors").unlink()
    (broken / "stray.txt").write_text("half-written", encoding="utf-8")
    run_study(TINY, jobs=2, out=tiny_study, quiet=True)
    assert is_finished(broken) and not (broken / "stray.txt").exists()  # the folder was redone from scratch
    assert is_finished(resumed) and _metrics(resumed)["accuracy"] == expected
    assert "--resume" in (resumed.with_name("seed-0.log")).read_text(encoding="utf-8")
    for p, mtime in before.items():
        if p.parent not in (broken, resumed):
            assert p.stat().st_mtime_ns == mtime, f"{p} was rerun"
    s = aggregate(tiny_study)
    assert s["variants"][1]["metrics"]["accuracy"]["values"][1] == _metrics(broken)["accuracy"]


def test_rerun_with_a_changed_study_refuses_stale_runs(tiny_study, tmp_path):
    text = TINY.read_text(encoding="utf-8").replace("base: alkhairi2023", f"base: {RECIPES}/alkhairi2023")
    changed = write_study(tmp_path, text.replace("optim.lr: 0.001}", "optim.lr: 0.002}"), "tiny-study.yaml")
    with pytest.raises(StudyError, match=r"runs/cnn-adam/seed-0: optim.lr: 0.001 → 0.002"):
        run_study(changed, out=tiny_study, quiet=True)


def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path, cnnlab_cache):
    p = write_study(tmp_path, f"overrides: {{data.source: 'folder:{tmp_path}/missing', train.epochs: 1}}\n"
                              "variants:\n  broken: {}\n")
    d = run_study(p, out=tmp_path / "out", quiet=True)
    s = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    (v,) = s["variants"]
    assert v["runs"] == [] and v["failed"][0]["run"] == "runs/broken/seed-0"
    assert "exit code 2" in v["failed"][0]["error"] and "missing" in v["failed"][0]["error"]
    assert s["best"] is None and s["comparisons"] == [] and v["metrics"]["accuracy"]["mean"] is None
    assert "| broken (1 failed) |" in (d / "table.md").read_text(encoding="utf-8")
