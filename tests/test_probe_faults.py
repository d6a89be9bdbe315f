"""Faults found by probing the CLI as a demanding user and an attacker would (issue 11), one test each.

Damaged files name themselves; configs that would take minutes or crash are refused at once; names from
outside never reach the terminal or a figure raw; a run folder has one trainer at a time; a study's
children die with it; a full disk loses nothing and says how to go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cnnlab import cli
from cnnlab.api import evaluate
from cnnlab.config import ConfigError, load_config
from cnnlab.runs import RunError, load_run
from cnnlab.tensorfile import TensorFileError
from conftest import fit_run

CNNLAB = [sys.executable, "-m", "cnnlab"]
SMALL = {"data.max_per_class": 12, "data.batch_size": 16, "train.epochs": 1}


def _cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, cnnlab_cache):
    return fit_run(SMALL, out=tmp_path_factory.mktemp("probe") / "run").path


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


# --------------------------------------------------------------------------- damaged files

def test_a_truncated_model_file_is_a_clear_error_for_eval_and_predict(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path)
    model = run / "model.safetensors"
    os.truncate(model, model.stat().st_size // 2)
    for args in (["eval", run], ["predict", run, tmp_path]):
        code, _, err = _cli(args, capsys)
        assert code == 2, err
        assert str(model) in err and "Traceback" not in err and err.startswith("cnnlab: error:")


def _flip_bit(path: Path, from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x40  # an exponent bit of some float32
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_model_is_caught_by_its_checksum(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path)
    _flip_bit(run / "model.safetensors", 1001)
    code, _, err = _cli(["eval", run], capsys)
    assert code == 2 and "damaged model file" in err and str(run / "model.safetensors") in err
    with pytest.raises(TensorFileError, match="checksum"):
        load_run(run).model  # noqa: B018 — loading is the test


def test_a_flipped_bit_in_a_checkpoint_is_caught_not_reported_as_divergence(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path)
    _flip_bit(run / "checkpoint.safetensors", 5003)
    code, _, err = _cli(["train", "--resume", run, "train.epochs=2", "--force", "train.epochs"], capsys)
    assert code == 2 and "damaged checkpoint" in err and "diverged" not in err, err
    assert str(run / "checkpoint.safetensors") in err


def test_a_truncated_split_json_names_the_file(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path)
    split = run / "split.json"
    split.write_text(split.read_text()[:100])
    with pytest.raises(RunError, match="split.json: unreadable JSON"):
        evaluate(run)
    code, _, err = _cli(["train", "--resume", run, "train.epochs=2", "--force", "train.epochs"], capsys)
    assert code == 2 and f"{split}: unreadable JSON" in err, err


# --------------------------------------------------------------------------- configs refused at once

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
                 + ["model: {hidden: *a9}"])  # 9^10 ≈ 3.5e9 values once expanded, from ~400 bytes


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert path.stat().st_size < 600
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(path)
    flow = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [" + ",".join(["*a" if i == 1 else f"*a{i-1}"] * 9)
                                                          + "]" for i in range(1, 10)]) + "]"
    with pytest.raises(ConfigError, match="override model.hidden expands to more than|expands to more than"):
        load_config(None, [f"model.hidden={flow}"])
    path.write_text("a: &x [*x]\n")  # an alias inside itself: refused, as before
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(path)


def test_far_too_many_threads_is_a_clear_error_not_a_segfault(tmp_path):
    r = subprocess.run(CNNLAB + ["train", "-", "train.threads=100000", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "train.threads=100000: at most 4 per core" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key", ["train.seed", "data.split_seed"])
def test_a_seed_beyond_32_bits_names_its_key(key):
    with pytest.raises(ConfigError, match=f"{key}: must be at most 4294967295"):
        load_config(None, [f"{key}=18446744073709551615"])


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", "..", "with\x1bescape"])
def test_a_run_name_cannot_leave_the_runs_root(name, tmp_path):
    with pytest.raises(ConfigError, match="one folder under the runs root"):
        load_config(None, {"name": name})
    assert not (tmp_path.parent / "x").exists()


def test_overrides_may_follow_options(tmp_path, capsys):
    out = tmp_path / "after"
    code, _, err = _cli(["train", "-", "--out", out, "--no-report", "-q", "train.epochs=1", "data.max_per_class=8",
                         "data.batch_size=16"], capsys)
    assert code == 0, err
    assert load_run(out).config.data.max_per_class == 8
    with pytest.raises(SystemExit):
        cli.main(["train", "-", "--out", str(tmp_path / "x"), "--bogus"])


# --------------------------------------------------------------------------- names from outside

NASTY = {"cat\x1b[2J": 12, "dog\tpaw": 12}


def test_class_names_with_control_codes_are_printed_escaped(image_folder, tmp_path, capsys):
    root = image_folder(NASTY)
    run = fit_run({**SMALL, "data.source": f"folder:{root}", "data.image_size": 16}, out=tmp_path / "nasty")
    code, out, err = _cli(["eval", run.path], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\t" not in out
    assert "cat\\x1b[2J" in out and "dog\\tpaw" in out
    code, out, _ = _cli(["datasets", "inspect", f"folder:{root}", "--image-size", "16"], capsys)
    assert code == 0 and "\x1b" not in out and "cat\\x1b[2J" in out
    code, out, _ = _cli(["predict", run.path, root / "cat\x1b[2J"], capsys)
    assert "\x1b" not in out


def test_figures_draw_any_class_name_without_glyph_warnings(tmp_path):
    from cnnlab.report import plots

    names = ["猫", "tab\there", "price $5$", "ok"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.class_counts({"train": [5, 4, 3, 2], "val": [1, 1, 1, 1], "test": [1, 1, 1, 1]}, names,
                           tmp_path / "counts.png")
        plots.confusion([[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 2, 0], [1, 0, 0, 3]], names, tmp_path / "cm.png")
    assert not [w for w in caught if "Glyph" in str(w.message) or "missing from" in str(w.message)], \
        [str(w.message) for w in caught]
    assert (tmp_path / "counts.png").stat().st_size > 1000
    assert plots.drawable("tab\there") == "tab\\there" and plots.drawable("$5$") == r"\$5\$"


# --------------------------------------------------------------------------- one trainer per run folder

def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1] if proc.poll() else "timeout"
        time.sleep(0.05)


def test_a_run_in_use_refuses_a_second_resume_and_report_says_it_is_training(tmp_path):
    from cnnlab.api import train
    from cnnlab.report import ReportError, write_report

    run = tmp_path / "busy"
    p = subprocess.Popen(CNNLAB + ["train", "-", "data.max_per_class=60", "train.epochs=200", "train.threads=1",
                                   "--out", str(run), "--no-report", "-q"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "checkpoint.safetensors", p)
        with pytest.raises(RunError, match=f"in use by pid {p.pid}"):
            train(None, resume=run, quiet=True)
        with pytest.raises(ReportError, match=f"still training \\(pid {p.pid}\\)"):
            write_report(run)
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    assert p.returncode == 130  # stopped cleanly; now the folder is free again
    from cnnlab.runs import training_pid

    assert training_pid(run) is None


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_a_study_stops_its_running_child(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("base: null\noverrides: {data.max_per_class: 60, train.epochs: 5000, data.batch_size: 32}\n"
                     "seeds: [0]\n")  # ~0.1 s an epoch: it would train on for minutes
    out = tmp_path / "out"
    p = subprocess.Popen(CNNLAB + ["compare", str(study), "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ckpt = out / "runs" / "base" / "seed-0" / "checkpoint.safetensors"
    try:
        _wait_for(ckpt, p)
        children = [pid for pid in _processes_mentioning(str(out / "runs")) if pid != p.pid]
        assert children, "no child training process found"
    finally:
        p.kill()
        p.communicate()
    deadline = time.time() + 60
    while any(_state(pid) != "Z" for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in children if _state(pid) != "Z"]
    for pid in alive:  # an orphan: end it before failing
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the study's child kept training after the study was killed"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


# --------------------------------------------------------------------------- a full disk

@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB tmpfs (needs root to mount; CI runs as root)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the disk-full test needs root to mount a tmpfs, and CI runs as root")
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_names_the_file_leaves_nothing_half_made_and_resumes(tiny_disk, capsys):
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 60_000)  # ~4 KiB left: too little for split.json
    first = tiny_disk / "first"
    code, _, err = _cli(["train", "-", *[f"{k}={v}" for k, v in SMALL.items()], "--out", first, "--no-report", "-q"],
                        capsys)
    assert code == 2 and "No space left on device" in err and str(first) in err, err
    assert not first.exists()  # no half-made config.yaml / split.json left behind

    filler.unlink()  # 64 KiB: enough for the run folder, not for a checkpoint of ~10 MB
    run = tiny_disk / "run"
    code, _, err = _cli(["train", "-", *[f"{k}={v}" for k, v in SMALL.items()], "--out", run, "--no-report", "-q"],
                        capsys)
    assert code == 2 and f"{run / 'checkpoint.safetensors'}" in err and "No space left on device" in err, err
    assert f"cnnlab train --resume {run}" in err
    assert json.loads((run / "split.json").read_text())["train"]  # complete, not half-written
    assert not list(run.glob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    code, _, err = _cli(["train", "--resume", run, "--no-report", "-q"], capsys)
    assert code == 0, err
    assert (run / "metrics.json").is_file() and torch.isfinite(
        torch.tensor(json.loads((run / "metrics.json").read_text())["loss"]))
