"""The `postgres_url` fixture gives a real PostgreSQL server that several processes share
(what `cnnlab tune --storage postgresql://…` relies on: Optuna's RDB storage)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

TRIALS_PER_WORKER = 4

# One worker process: wait until every worker has loaded the study (so they really run at the
# same time), then run a few trials of a trivial objective, tagging each with the worker's pid.
WORKER = textwrap.dedent("""
    import os, sys, time
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name, ready_dir, me, n_workers, n_trials = sys.argv[1:7]
    study = optuna.load_study(study_name=name, storage=url)
    open(os.path.join(ready_dir, me), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(ready_dir)) < int(n_workers):
        if time.monotonic() > deadline:
            sys.exit("the other worker never came")
        time.sleep(0.02)

    def objective(trial):
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("worker", me)
        x = trial.suggest_float("x", -10, 10)
        time.sleep(0.05)  # let the two workers' trials interleave
        return (x - 2) ** 2

    study.optimize(objective, n_trials=int(n_trials))
""")


def _need(module: str):
    """Import `module`; skip without it, but fail when CI=true (as the postgres_url fixture does)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is needed on CI for the PostgreSQL tests: {e}")
        pytest.skip(f"{module} is not installed")


def test_server_answers_sql(postgres_url):
    sa = _need("sqlalchemy")
    assert postgres_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("select version()")).scalar_one()
            db, user = conn.execute(sa.text("select current_database(), current_user")).one()
            listen = conn.execute(sa.text("show listen_addresses")).scalar_one()
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL ")
    assert (db, user) == ("cnnlab", "postgres")
    assert listen == "127.0.0.1"


def test_optuna_study_shared_by_two_processes(postgres_url, tmp_path):
    optuna = _need("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = "shared-by-two"
    # Created here first, so the two workers do not race to create Optuna's tables.
    optuna.create_study(storage=postgres_url, study_name=name, load_if_exists=True)

    ready = tmp_path / "ready"
    ready.mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, name, str(ready),
                                 f"w{i}", "2", str(TRIALS_PER_WORKER)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = []
    for p in workers:
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outputs.append(out)
    for p, out in zip(workers, outputs):
        assert p.returncode == 0, f"worker exited {p.returncode}:\n{out}"

    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials(deepcopy=False)
    assert len(trials) == 2 * TRIALS_PER_WORKER
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(2 * TRIALS_PER_WORKER))  # distinct, no gaps
    by_worker = Counter(t.user_attrs["worker"] for t in trials)
    assert by_worker == {"w0": TRIALS_PER_WORKER, "w1": TRIALS_PER_WORKER}
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two other OS processes wrote them
    assert {p.pid for p in workers} == pids
