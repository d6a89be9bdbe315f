"""The Ray executor on a real Ray cluster (`ray start --head` on 127.0.0.1, 2 CPUs): a study through Ray gives
the same run folders as the local executor, a failing run is recorded as failed, a run killed from outside is run
again, Ctrl-C cancels the runs in flight, and a tune runs its trials through Ray."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:
    import ray  # noqa: F401
except ImportError as e:  # skip without Ray, but fail on CI (the Makefile installs cnnlab[ray])
    if os.environ.get("CI") == "true":
        pytest.fail(f"Ray is needed on CI for the Ray executor tests: {e}", pytrace=False)
    pytest.skip("ray is not installed (pip install 'cnnlab[ray]')", allow_module_level=True)

from cnnlab.runs import is_finished, read_json, training_pid  # noqa: E402
from cnnlab.study.executors import RunRequest  # noqa: E402
from cnnlab.study.ray_executor import RayExecutor, RayUnavailable, check_address, killed_from_outside  # noqa: E402
from conftest import write_spec as write_study  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TIMING = {"training_seconds"}  # metrics.json fields that are wall times, not results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(pgid: int, wait: float = 10.0) -> None:
    """Stop every process of the cluster with SIGKILL (as `ray stop --force` does): `ray start` ran in a session
    of its own, and its daemons, the workers and their `cnnlab train` children all share its process group
    (`ray stop` itself would stop every Ray on the machine, not only this one)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    t0 = time.monotonic()
    while _group_alive(pgid) and time.monotonic() - t0 < wait:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_head(cnnlab_cache):
    """A one-node Ray cluster (2 CPUs) on 127.0.0.1; its address. The workers inherit this environment
    (CNNLAB_CACHE included) and this interpreter, so their `python -m cnnlab train` children find cnnlab."""
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.fail(f"no `ray` script next to {sys.executable}")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets allow 107 characters
    # Token authentication with a token of its own, given to the cluster and (inherited) to every `cnnlab`
    # driver: the head listens on every interface, and a ~/.ray/auth_token left by another Ray must not matter
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
           "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
           "--temp-dir", temp]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{out[-3000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        _stop_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)
        mp.undo()


def cnnlab(cnnlab_bin, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(cnnlab_bin), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- without a cluster

@pytest.mark.parametrize("code, again", [(-9, True), (-15, True), (-2, True), (137, True), (143, True), (130, True),
                                         (0, False), (1, False), (2, False), (3, False), (None, False),
                                         (-11, False), (-6, False)])
def test_which_exit_codes_are_run_again(code, again):
    assert killed_from_outside(code) is again


@pytest.mark.parametrize("kw, words", [({"cpus_per_run": 0}, "--cpus-per-run"), ({"jobs": 0}, "--jobs"),
                                       ({"max_retries": -1}, "max_retries"), ({"gpus_per_run": -1}, "gpus_per_run")])
def test_bad_settings_are_refused_before_connecting(kw, words):
    with pytest.raises(ValueError, match=words):
        RayExecutor(**kw)


def test_a_run_gets_the_reserved_cpus_as_threads_unless_its_config_sets_them(tmp_path):
    ex = RayExecutor(cpus_per_run=4, jobs=1)
    plain = RunRequest("a", tmp_path / "a", tmp_path / "a.yaml", 0, threads=16, expected={"train": {"threads": None}})
    own = RunRequest("b", tmp_path / "b", tmp_path / "b.yaml", 0, threads=None, expected={"train": {"threads": 2}})
    assert ex.threads(plain) == 4 and ex.threads(own) is None
    assert RayExecutor(cpus_per_run=0.5, jobs=1).threads(plain) == 1


def test_an_unreachable_address_fails_at_once_with_a_clear_message():
    t0 = time.monotonic()
    with pytest.raises(RayUnavailable, match=r"127.0.0.1:\d+: Connection refused \(is `ray start --head"):
        RayExecutor(address=f"127.0.0.1:{_free_port()}").connect()  # Ray itself would keep trying for minutes
    assert time.monotonic() - t0 < 10
    with pytest.raises(RayUnavailable, match="expected HOST:PORT"):
        check_address("headnode")


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayUnavailable, match=r"pip install 'cnnlab\[ray\]'"):
        RayExecutor().connect()


def test_address_without_the_ray_executor_is_refused(cnnlab_bin, tmp_path):
    p = cnnlab(cnnlab_bin, "compare", RECIPES / "tiny-study.yaml", "--address", "127.0.0.1:1", "--out", tmp_path / "s")
    assert p.returncode == 2 and "--executor ray" in p.stderr and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- on the cluster

def _run_dirs(study_dir: Path) -> list[Path]:
    return sorted(d for d in study_dir.glob("runs/*/seed-*") if d.is_dir())


def test_a_study_through_ray_gives_the_same_runs_as_the_local_executor(ray_head, cnnlab_bin, tmp_path, tiny_study):
    """The session's tiny study (conftest.py: the local executor, 2 runs at once) again through Ray, each run with
    the threads the local executor gave it (results depend on them): the same run folders, bit for bit."""
    from safetensors.numpy import load_file

    a, b = tmp_path / "A", tiny_study
    threads = {read_json(r / "env.json")["threads"] for r in _run_dirs(b)}
    assert len(threads) == 1
    p = cnnlab(cnnlab_bin, "compare", RECIPES / "tiny-study.yaml", f"train.threads={threads.pop()}",
               "--executor", "ray", "--address", ray_head, "--out", a)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "4 to run, 2 at a time" in p.stdout  # the cluster's 2 CPUs / 1 CPU a run
    runs = _run_dirs(a)
    assert [r.relative_to(a) for r in runs] == [r.relative_to(b) for r in _run_dirs(b)] and len(runs) == 4
    for ra in runs:
        rb = b / ra.relative_to(a)
        ma, mb = read_json(ra / "metrics.json"), read_json(rb / "metrics.json")
        assert {k: v for k, v in ma.items() if k not in TIMING} == {k: v for k, v in mb.items() if k not in TIMING}
        assert "per_class" in ma and "accuracy" in ma and "loss" in ma
        ta, tb = load_file(ra / "model.safetensors"), load_file(rb / "model.safetensors")
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and (ta[k] == tb[k]).all(), f"{ra.relative_to(a)}: {k} differs"
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    assert [v["metrics"]["accuracy"]["values"] for v in sa["variants"]] == \
        [v["metrics"]["accuracy"]["values"] for v in sb["variants"]]


def _wait_for_training(run_dir: Path, timeout: float = 120) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid = training_pid(run_dir) if run_dir.is_dir() else None
        if pid and pid > 0 and (run_dir / "checkpoint.safetensors").is_file():  # past its first epoch
            return pid
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not start training within {timeout} s")


LONG_RUN = """base: RECIPES/demo.yaml
overrides: {data.max_per_class: 30, train.epochs: 30, train.early_stopping: null, schedule.name: constant,
            train.threads: 1}
variants:
  only: {}
seeds: [0]
"""


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed worker's child may wait to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_killed_from_outside_is_run_again_and_a_failing_one_is_not(ray_head, cnnlab_bin, tmp_path):
    """SIGKILL (as the out-of-memory killer sends) on a run's process: submitted again, resumed from its checkpoint;
    a run failing on its own (missing data: exit code 2) is recorded as failed while the other finishes."""
    spec = write_study(tmp_path, LONG_RUN.replace("  only: {}", "  only: {}\n  broken: {data.source: 'folder:MISSING'}")
                       .replace("MISSING", str(tmp_path / "missing")))
    d = tmp_path / "out"
    proc = subprocess.Popen([str(cnnlab_bin), "compare", str(spec), "--executor", "ray", "--address", ray_head,
                             "--out", str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = d / "runs" / "only" / "seed-0"
        os.kill(_wait_for_training(run), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:] + err[-3000:]  # a run failed
    assert "only seed 0 was stopped from outside (exit code -9" in err and "(1 of 2)" in err
    assert "broken seed 0 was stopped" not in err  # its own failure: not run again
    s = read_json(d / "summary.json")
    only, broken = s["variants"]
    assert only["runs"] == ["runs/only/seed-0"] and only["failed"] == [] and is_finished(run)
    assert "--resume" in run.with_name("seed-0.log").read_text(encoding="utf-8")  # from its checkpoint
    assert broken["runs"] == [] and broken["failed"][0]["run"] == "runs/broken/seed-0"
    assert "exit code 2" in broken["failed"][0]["error"] and "missing" in broken["failed"][0]["error"]
    assert "FAILED broken seed 0" in out and (d / "runs" / "broken" / "seed-0.failed.json").is_file()


def test_ctrl_c_cancels_the_runs_in_flight(ray_head, cnnlab_bin, tmp_path):
    spec = write_study(tmp_path, LONG_RUN.replace("train.epochs: 30", "train.epochs: 3000"))  # minutes: never done first
    d = tmp_path / "out"
    # SIGINT as a terminal delivers it: a test suite started in the background (`make test &`, nohup) inherits
    # SIGINT ignored, and Python then never turns it into KeyboardInterrupt — give the driver the default back
    proc = subprocess.Popen([str(cnnlab_bin), "compare", str(spec), "--executor", "ray", "--address", ray_head,
                             "--out", str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        run = d / "runs" / "only" / "seed-0"
        child = _wait_for_training(run)
        proc.send_signal(signal.SIGINT)  # only the driver: Ray's workers are not in its process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    t0 = time.monotonic()
    while training_pid(run) is not None and time.monotonic() - t0 < 60:  # cancelled: its training stops
        time.sleep(0.2)
    assert training_pid(run) is None and not is_finished(run) and not _alive(child)
    assert (run / "checkpoint.safetensors").is_file()  # a clean stop (SIGTERM): a rerun resumes it


def test_a_tune_through_ray(ray_head, cnnlab_bin, tmp_path):
    pytest.importorskip("optuna") if os.environ.get("CI") != "true" else __import__("optuna")
    t = tmp_path / "T"
    p = cnnlab(cnnlab_bin, "tune", RECIPES / "tune-tiny.yaml", "--executor", "ray",
               "--address", ray_head, "--out", t, "--trials", "2", "--no-revalidate")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 at a time" in p.stdout
    s = read_json(t / "summary.json")
    rows = [r for r in s["trials"] if r["state"] != "superseded"]
    assert len(rows) == 2 and all(r["state"] in ("complete", "pruned", "fail") for r in rows)
    assert s["counts"]["complete"] + s["counts"]["pruned"] + s["counts"]["fail"] == 2 and s["counts"]["complete"] >= 1
    for n in (0, 1):
        assert is_finished(t / "trials" / f"trial-{n:04d}")
    assert json.loads((t / "tune.json").read_text(encoding="utf-8"))["name"] == "tune-tiny"
