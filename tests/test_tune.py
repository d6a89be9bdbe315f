"""`cnnlab tune`: a tiny tune end to end on real data (Animal-Shape), reproducibility, crash safety, failed
trials, the test split withheld from the search, two processes sharing one PostgreSQL study, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna") if os.environ.get("CI") != "true" else __import__("optuna")

from cnnlab import stats  # noqa: E402
from cnnlab.config import load_config  # noqa: E402
from cnnlab.runs import read_csv, read_json, training_pid  # noqa: E402
from cnnlab.tune.search import SUPERSEDED  # noqa: E402
from cnnlab.tune.runner import run_tune  # noqa: E402
from cnnlab.tune.spec import TuneError, load_tune  # noqa: E402
from conftest import finished, write_spec  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tune-tiny.yaml"


def write_tune(tmp_path: Path, text: str, name: str = "tune.yaml") -> Path:
    return write_spec(tmp_path, text, name)


def tune_cmd(cnnlab_bin, *args) -> list[str]:
    return [str(cnnlab_bin), "tune", *map(str, args)]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def trials_of(tune_dir: Path) -> list[dict]:
    return read_json(tune_dir / "summary.json")["trials"]


def counted(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["state"] != "superseded"]


# --------------------------------------------------------------------------- the tiny tune, end to end

@pytest.fixture(scope="module")
def tiny_tune(tmp_path_factory, cnnlab_cache, cnnlab_bin):
    out = tmp_path_factory.mktemp("tune") / "tiny"
    p = run(tune_cmd(cnnlab_bin, TINY, "--out", out, "--jobs", "2"))  # two trials at once
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_tiny_tune_runs_every_trial_as_a_run_folder(tiny_tune):
    out, stdout = tiny_tune
    summary = read_json(out / "summary.json")
    rows = counted(summary["trials"])
    assert len(rows) == 4 == summary["trials_asked"]
    assert all(r["state"] in ("complete", "pruned") for r in rows), rows
    for r in rows:
        run_dir = out / r["run"]
        m = read_json(run_dir / "metrics.json")
        cfg = load_config(run_dir / "config.yaml")
        for key, value in r["params"].items():  # the trial trained with its parameters
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value
        if r["state"] == "complete":
            assert r["value"] == pytest.approx(m["accuracy"])  # the objective: validation accuracy of the kept model
        assert (run_dir / "model.safetensors").is_file() and (run_dir / "history.csv").is_file()
    # conditional parameter: momentum only for sgd
    for r in rows:
        assert ("optim.momentum" in r["params"]) == (r["params"]["optim.name"] == "sgd")
    assert "search: " in stdout and "re-validation" in stdout


def test_the_test_split_is_never_read_during_the_search(tiny_tune):
    out, _ = tiny_tune
    for r in counted(trials_of(out)):
        run_dir = out / r["run"]
        cfg = load_config(run_dir / "config.yaml")
        assert cfg.data.withhold_test is True
        m = read_json(run_dir / "metrics.json")
        assert m["evaluated_on"] == "val"
        split = read_json(run_dir / "split.json")
        assert split["test"], "the split still cuts a test part (the same split the re-validation uses)"
        predicted = {int(row["index"]) for row in read_csv(run_dir / "predictions.csv")}
        assert predicted == set(split["val"]) and not predicted & set(split["test"])
    # the re-validation runs, and only they, are evaluated on the test split — the same one
    trial_split = read_json(out / counted(trials_of(out))[0]["run"] / "split.json")
    for run_dir in (out / "revalidate" / "runs").glob("*/seed-*"):
        if run_dir.is_dir():
            assert read_json(run_dir / "metrics.json")["evaluated_on"] == "test"
            assert read_json(run_dir / "split.json")["test"] == trial_split["test"]


def test_withheld_test_split_never_reaches_a_loader():
    from cnnlab.experiment import build_experiment

    x = build_experiment(load_config(RECIPES / "demo.yaml", ["data.max_per_class=30", "data.withhold_test=true"]))
    assert x.data.test is None and x.data.eval_part == "val"
    assert len(x.split.test) > 0 and x.split_json()["test"] == x.split.test  # listed, never loaded
    seen = x.data.train.num_samples + len(x.data.val.labels)
    assert seen == len(x.split.train) + len(x.split.val)


def test_revalidation_compares_the_best_with_the_base_on_fresh_seeds(tiny_tune):
    out, stdout = tiny_tune
    summary = read_json(out / "summary.json")
    reval = summary["revalidation"]
    plan = read_json(out / "revalidate" / "plan.json")
    assert plan["seeds"] == [100, 101] and plan["reference"] == "base"
    names = [v["name"] for v in plan["variants"]]
    top = sorted([r for r in counted(summary["trials"]) if r["state"] == "complete"],
                 key=lambda r: -r["value"])[:2]
    assert names == ["base"] + [f"trial-{r['number']}" for r in top]
    rsum = read_json(out / "revalidate" / "summary.json")
    assert rsum["reference"] == "base" and rsum["selection_note"] is None
    assert {c["against"] for c in rsum["comparisons"]} == {"base"}
    for c in rsum["comparisons"]:  # Holm over the candidates: never below the raw p
        assert c["mcnemar_p_holm"] >= c["mcnemar_p"]
    assert reval["winner"] in names[1:]
    # the winner is chosen on validation (the objective), not on test
    assert reval["winner"] == max(names[1:], key=lambda n: reval["validation"][n])
    assert ("It is significantly better" in reval["sentence"]) == reval["better"]
    assert ("NOT significantly better" in reval["sentence"]) == (not reval["better"] and not reval["worse"])
    assert reval["sentence"] in stdout
    best = load_config(out / "best.yaml")
    winner = next(r for r in top if f"trial-{r['number']}" == reval["winner"])
    for key, value in winner["params"].items():
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == value
    assert best.data.withhold_test is False  # a ready run config: trained with `cnnlab train best.yaml`


def test_tune_report_has_its_figures(tiny_tune, capsys):
    out, _ = tiny_tune
    from cnnlab import cli

    assert cli.main(["report", str(out)]) == 0  # rewritten, said as for a run: "report: PATH"
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 3
    for name in ("tune_history.png", "tune_slices.png", "tune_curves.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    assert "Re-validation on fresh seeds" in html and "Holm" in html


def test_rerun_of_a_finished_tune_trains_nothing(tiny_tune, cnnlab_bin):
    out, _ = tiny_tune
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.json")}
    p = run(tune_cmd(cnnlab_bin, TINY, "--out", out, "--no-revalidate"))
    assert p.returncode == 0, p.stderr
    assert "start  trial" not in p.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.json")} == before
    assert len(counted(trials_of(out))) == 4


# --------------------------------------------------------------------------- reproducible, crash-safe

SEARCH = """base: RECIPES/demo.yaml
overrides: {{data.max_per_class: 40, train.epochs: {epochs}, data.batch_size: 64}}
space:
  optim.lr: {{low: 1.0e-4, high: 3.0e-2, log: true}}
  model.dropout: {{low: 0.0, high: 0.5}}
  optim.name: [adamw, sgd, rmsprop]
trials: {trials}
sampler: {{name: tpe, seed: {seed}}}
pruner: none
revalidate: false
"""


def test_same_seed_gives_the_same_trial_sequence(tmp_path, cnnlab_bin):
    procs = {}
    for name, seed, trials in (("a", 7, 2), ("b", 7, 2), ("c", 8, 1)):  # at once: each is mostly start-up
        spec = write_tune(tmp_path, SEARCH.format(epochs=1, trials=trials, seed=seed), f"{name}.yaml")
        procs[name] = subprocess.Popen(tune_cmd(cnnlab_bin, spec, "--out", tmp_path / name),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seqs = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        seqs[name] = [(r["params"], r["value"]) for r in counted(trials_of(tmp_path / name))]
    assert len(seqs["a"]) == 2 and seqs["a"] == seqs["b"]  # same sampler seed, one worker: same parameters, results
    assert seqs["a"][0][0] != seqs["c"][0][0]  # another seed: another first trial
    assert read_json(tmp_path / "a" / "tune.json")["sampler"] == {"name": "tpe", "seed": 7}


def test_sigkill_then_rerun_keeps_finished_trials_and_reruns_the_interrupted_one(tmp_path, cnnlab_bin):
    spec = write_tune(tmp_path, SEARCH.format(epochs=12, trials=3, seed=3))
    out = tmp_path / "t"
    proc = subprocess.Popen(tune_cmd(cnnlab_bin, spec, "--out", out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    target = out / "trials" / "trial-0001" / "checkpoint.safetensors"
    t0 = time.time()
    while not target.exists():  # the second trial is under way, past its first epoch
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 180
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [r for r in trials_of_journal(spec, out)]
    assert [r.state.name for r in first] == ["COMPLETE", "RUNNING"]  # killed: trial 1 left running

    # an uninterrupted run of the interrupted trial's config (written before it started), trained alongside the rerun
    cfg = out / "trials" / "trial-0001.yaml"
    fresh = tmp_path / "fresh"
    uninterrupted = subprocess.Popen([str(cnnlab_bin), "train", str(cfg), "--out", str(fresh), "--no-report",
                                      "--progress", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p = run(tune_cmd(cnnlab_bin, spec, "--out", out))
    finally:
        q = finished(uninterrupted, 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "trial 1 was interrupted" in p.stdout
    rows = trials_of(out)
    live = counted(rows)
    assert len(live) == 3 and all(r["state"] == "complete" for r in live)  # the number asked, no more
    params = [json.dumps(r["params"], sort_keys=True) for r in live]
    assert len(set(params)) == 3  # no duplicate parameters
    gone = [r for r in rows if r["state"] == "superseded"]
    assert len(gone) == 1 and gone[0]["number"] == 1 and "interrupted" in gone[0]["reason"]
    retry = next(r for r in live if r.get("retry_of") == 1)
    assert retry["params"] == gone[0]["params"] and retry["run"] == "trials/trial-0001"  # same folder, resumed
    assert "Resuming" in (out / "trials" / "trial-0001.log").read_text(encoding="utf-8")
    assert training_pid(out / "trials" / "trial-0001") is None
    # the resumed trial is bit-identical to an uninterrupted run of the same config
    assert q.returncode == 0, q.stderr
    assert read_json(fresh / "metrics.json")["accuracy"] == retry["value"]


def trials_of_journal(spec_path: Path, out: Path):
    from cnnlab.tune.storage import journal_url, open_storage

    study = optuna.load_study(study_name=load_tune(spec_path).name,
                              storage=open_storage(journal_url(out / "optuna.journal")))
    return study.get_trials()


def test_a_failing_trial_is_recorded_as_failed_with_its_reason(tmp_path, cnnlab_bin):
    spec = write_tune(tmp_path, """overrides: {data.max_per_class: 40, data.batch_size: 16, train.epochs: 3,
            optim.name: sgd, optim.momentum: 0}
space:
  optim.lr: [10.0]
trials: 1
pruner: none
""")
    p = run(tune_cmd(cnnlab_bin, spec, "--out", tmp_path / "t"))
    assert p.returncode == 0, p.stderr  # the search ended: its one trial failed, which is a result
    summary = read_json(tmp_path / "t" / "summary.json")
    (row,) = counted(summary["trials"])
    assert row["state"] == "fail" and row["value"] is None
    assert "diverged" in row["reason"] and "optim.lr" in row["reason"]
    assert summary["counts"]["fail"] == 1 and summary["best_trial"] is None
    assert "FAILED trial 0" in p.stdout and "nothing to re-validate" in p.stdout


# --------------------------------------------------------------------------- bad input, before any training

@pytest.mark.parametrize("space, words", [
    ("optim.lrr: [0.1]", ["optim.lrr", "did you mean optim.lr"]),
    ("optim.lr: {low: 0.1, high: 0.01}", ["optim.lr", "empty range"]),
    ("optim.name: [adam, adamx]", ["adamx", "sgd, adam, adamw, rmsprop"]),
    ("model.name: {low: 1, high: 2}", ["model.name", "list of choices"]),
    ("optim.momentum: {low: 0.8, high: 0.9, when: {optim.name: sgd}}", ["optim.name", "not a space key"]),
    ("optim.lr: {low: 0.0, high: 0.1, log: true}", ["log-scale", "low > 0"]),
])
def test_bad_space_fails_before_any_training(tmp_path, space, words):
    spec = write_tune(tmp_path, f"base: RECIPES/demo.yaml\nspace:\n  {space}\ntrials: 2\n")
    with pytest.raises(TuneError) as e:
        run_tune(spec, out=tmp_path / "t", quiet=True)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "t").exists()


def test_bad_space_on_the_command_line_is_one_plain_line(tmp_path, cnnlab_bin):
    spec = write_tune(tmp_path, "base: RECIPES/demo.yaml\nspace:\n  optim.name: [adam, adamx]\n")
    p = run(tune_cmd(cnnlab_bin, spec, "--out", tmp_path / "t"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("cnnlab: error: ") and "adamx" in p.stderr and not (tmp_path / "t").exists()


def test_tune_file_errors(tmp_path):
    with pytest.raises(TuneError, match="unknown tune key 'trails'.*did you mean 'trials'"):
        load_tune(write_tune(tmp_path, "space: {optim.lr: [0.1]}\ntrails: 3\n"))


def test_revalidation_seeds_must_be_fresh(tmp_path):
    spec = write_tune(tmp_path, "base: RECIPES/demo.yaml\nspace: {optim.lr: [0.1, 0.01]}\n"
                                "revalidate: {top: 1, seeds: [0, 1]}\n")
    with pytest.raises(TuneError, match="fresh seeds"):
        load_tune(spec)


def test_a_changed_search_is_not_mixed_with_an_old_one(tiny_tune, cnnlab_bin, tmp_path):
    out, _ = tiny_tune
    changed = write_tune(tmp_path, TINY.read_text(encoding="utf-8").replace("base: demo.yaml", "base: RECIPES/demo.yaml")
                         .replace("high: 3.0e-2", "high: 5.0e-2"))
    p = run(tune_cmd(cnnlab_bin, changed, "--out", out))
    assert p.returncode == 2 and "started with another space" in p.stderr, p.stderr


# --------------------------------------------------------------------------- statistics

def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.2, None, 0.01]) == [0.2, None, 0.02]
    s = stats.comparison_sentence("a", "b", 3.0, 0.02, n_images=100, seeds=2, adjusted_p=0.06, comparisons=3)
    assert s.startswith("a vs b: no significant difference (p = 0.020, Holm-corrected for 3 comparisons p = 0.060)")


# --------------------------------------------------------------------------- many workers, one PostgreSQL study

def test_two_processes_share_one_tune_through_postgresql(postgres_url, tmp_path, cnnlab_bin):
    spec = write_tune(tmp_path, SEARCH.format(epochs=1, trials=6, seed=1))
    out = tmp_path / "shared"
    cmd = tune_cmd(cnnlab_bin, spec, "--out", out, "--storage", postgres_url, "--no-revalidate")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
    study = optuna.load_study(study_name=load_tune(spec).name, storage=postgres_url)
    live = [t for t in study.get_trials() if SUPERSEDED not in t.system_attrs]
    assert len(live) == 6 and all(t.state.name == "COMPLETE" for t in live)
    workers = {t.system_attrs["cnnlab:worker"]["pid"] for t in live}
    assert workers == {p.pid for p in procs}  # both processes ran trials of the one study
    assert len({t.number for t in live}) == 6
    assert sorted(d.name for d in (out / "trials").iterdir() if d.is_dir()) == \
        sorted(f"trial-{t.number:04d}" for t in live)
    # both wrote summary.json (the one that computed its summary first may finish writing last): the file is the
    # settled search, not an older snapshot
    assert read_json(out / "summary.json")["counts"]["complete"] == 6


def test_a_worker_waits_for_another_workers_trial_and_runs_it_when_that_worker_is_gone(tmp_path, cnnlab_bin):
    """The budget is spent (trial 0 done, trial 1 running on another live worker): the worker waits instead of
    ending unsettled; when the other worker's process dies, it queues trial 1 again, runs it, and ends settled."""
    import socket

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from cnnlab.tune.search import HEARTBEAT, WORKER, _start_time, open_study
    from cnnlab.tune.storage import journal_url

    spec_file = write_tune(tmp_path, SEARCH.format(epochs=1, trials=2, seed=1))
    spec, out = load_tune(spec_file), tmp_path / "t"
    url = journal_url(out / "optuna.journal")
    study, storage, sid = open_study(spec, url)
    dist = FloatDistribution(1e-4, 3e-2, log=True)
    study.add_trial(create_trial(params={"optim.lr": 1e-3}, distributions={"optim.lr": dist}, value=0.5))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the other worker
    try:
        trial = study.ask({"optim.lr": dist})
        trial_id = storage.get_trial_id_from_study_id_trial_number(sid, trial.number)
        storage.set_trial_system_attr(trial_id, WORKER, {"host": socket.gethostname(), "pid": other.pid,
                                                         "start": _start_time(other.pid)})
        storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        p = subprocess.Popen(tune_cmd(cnnlab_bin, spec_file, "--out", out, "--no-revalidate"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in p.stdout:  # the worker says it waits; then the other worker dies
            seen.append(line)
            if line.startswith("waiting for trial 1 of another worker"):
                other.kill()
                other.wait()  # reaped: a zombie would still answer kill(pid, 0)
                break
        rest, _ = p.communicate(timeout=120)
        log = "".join(seen) + rest
    finally:
        other.kill()
        other.wait()
    assert p.returncode == 0, log
    assert "trial 1 was interrupted" in log and "queued again" in log
    s = read_json(out / "summary.json")
    assert s["counts"]["complete"] == 2 and s["counts"]["running"] == 0


def test_the_summary_keeps_its_revalidation_until_the_counts_change(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from cnnlab.tune.runner import write_summary
    from cnnlab.tune.search import open_study
    from cnnlab.tune.storage import journal_url

    spec = load_tune(write_tune(tmp_path, SEARCH.format(epochs=1, trials=3, seed=1)))
    url = journal_url(tmp_path / "optuna.journal")
    study, _, _ = open_study(spec, url)
    dist = {"optim.lr": FloatDistribution(1e-4, 3e-2, log=True)}
    study.add_trial(create_trial(params={"optim.lr": 1e-3}, distributions=dist, value=0.5))
    verdict = {"winner": "trial 0", "sentence": "trial 0 beats the base"}
    assert write_summary(spec, study, tmp_path, url, verdict)["revalidation"] == verdict
    # another worker's summary of the same state (it did not re-validate): the verdict stays in the file
    assert write_summary(spec, study, tmp_path, url)["revalidation"] == verdict
    assert read_json(tmp_path / "summary.json")["revalidation"] == verdict
    study.add_trial(create_trial(params={"optim.lr": 2e-3}, distributions=dist, value=0.6))
    s = write_summary(spec, study, tmp_path, url)  # the search moved on: the old verdict no longer describes it
    assert s["revalidation"] is None and s["counts"]["complete"] == 2


@pytest.mark.parametrize("storage, words", [
    ("postgresql://postgres@127.0.0.1:9/none", ["127.0.0.1:9", "cannot open it"]),
    ("mongodb://127.0.0.1/x", ["journal:PATH", "postgresql://"]),
])
def test_an_unusable_storage_is_a_clear_error(tmp_path, cnnlab_bin, storage, words):
    p = run(tune_cmd(cnnlab_bin, TINY, "--out", tmp_path / "t", "--storage", storage))
    assert p.returncode == 2, p.stdout + p.stderr
    for w in words:
        assert w in p.stderr
    assert "Traceback" not in p.stderr and not list((tmp_path / "t").glob("trials/*"))


def test_the_pruner_stops_a_hopeless_trial_inside_its_training(tmp_path, cnnlab_bin):
    """A trial far below a finished one is stopped after its first epoch, keeps its best epoch, and says so."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from cnnlab.tune.search import open_study
    from cnnlab.tune.storage import journal_url
    from cnnlab.tune.trial import TRIAL_ENV

    spec = load_tune(write_tune(tmp_path, """base: RECIPES/demo.yaml
overrides: {data.max_per_class: 30, train.epochs: 5, schedule.name: constant}
space: {optim.lr: {low: 1.0e-7, high: 1.0e-2, log: true}}
pruner: {name: median, startup_trials: 1, warmup_epochs: 0}
"""))
    url = journal_url(tmp_path / "optuna.journal")
    study, storage, sid = open_study(spec, url)
    dist = FloatDistribution(1e-7, 1e-2, log=True)
    study.add_trial(create_trial(params={"optim.lr": 3e-3}, distributions={"optim.lr": dist}, value=0.95,
                                 intermediate_values={e: 0.95 for e in range(1, 6)}))
    trial = study.ask({"optim.lr": dist})
    trial_id = storage.get_trial_id_from_study_id_trial_number(sid, trial.number)
    cfg = tmp_path / "trial.yaml"
    cfg.write_text(yaml.safe_dump(spec.trial_config({"optim.lr": 1e-7})), encoding="utf-8")
    link = {"storage": url, "study": spec.name, "trial_id": trial_id, "objective": "val_accuracy",
            "direction": "maximize", "pruner": spec.pruner}
    p = run([str(cnnlab_bin), "train", str(cfg), "--out", str(tmp_path / "run"), "--no-report", "--progress", "plain"],
            env={**os.environ, TRIAL_ENV: json.dumps(link)})
    assert p.returncode == 0, p.stderr
    m = read_json(tmp_path / "run" / "metrics.json")
    assert m["pruned"] is True and m["epochs_run"] == 1 and m["evaluated_on"] == "val"
    assert "Pruned by the tune after epoch 1" in p.stdout + p.stderr
    reported = storage.get_trial(trial_id).intermediate_values
    assert list(reported) == [1] and reported[1] < 0.95
