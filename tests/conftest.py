"""Shared fixtures: an isolated decode cache, tiny image folders, one small trained run.

Every test that trains uses tiny data (a few hundred 28×28 images, 1–3 epochs) so the
whole suite stays within a few minutes on two CPU cores.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The library must never write into ~/.cache while testing: cnnlab reads $CNNLAB_CACHE each
# time it caches, so a session-wide environment variable (inherited by CLI subprocesses) is enough.


@pytest.fixture(scope="session", autouse=True)
def cnnlab_cache(tmp_path_factory):
    """A fresh CNNLAB_CACHE for the whole session (also seen by CLI subprocesses)."""
    d = tmp_path_factory.mktemp("cnnlab-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CNNLAB_CACHE", str(d))
    mp.delenv("CNNLAB_DEBUG", raising=False)  # the CLI would re-raise instead of printing one line
    yield d
    mp.undo()


@pytest.fixture(scope="session")
def cnnlab_bin() -> Path:
    """The `cnnlab` console script of the interpreter running the tests."""
    exe = Path(sys.executable).parent / "cnnlab"
    if not exe.exists():
        pytest.skip(f"no cnnlab console script next to {sys.executable}")
    return exe


# --------------------------------------------------------------------------- image folders

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write_spec(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    """A study / tune spec written into tmp_path, with RECIPES standing for the project's recipes folder."""
    p = tmp_path / name
    p.write_text(text.replace("RECIPES", str(RECIPES)), encoding="utf-8")
    return p


def class_pattern(label: int, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A (size, size) uint8 image whose content depends on the class: a bright bar whose
    position encodes the label, plus a little noise so images differ."""
    img = np.zeros((size, size), np.uint8)
    band = max(1, size // 8)
    start = (label * band * 2) % max(1, size - band)
    img[:, start:start + band] = 220
    if rng is not None:
        img = np.clip(img.astype(int) + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
    return img


def write_image(path: Path, array: np.ndarray, mode: str = "L", fmt: str | None = None) -> Path:
    """Save a (H, W) uint8 array as an image of Pillow `mode` (L, RGB, RGBA, P, LA)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, "L")
    if mode == "P":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode != "L":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_image_folder(root: Path, classes: dict[str, int], size: int = 16, seed: int = 0,
                      ext: str = ".png", mode: str = "L") -> Path:
    """root/<class>/<class>_<i><ext> with `classes[name]` images per class."""
    rng = np.random.default_rng(seed)
    for label, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_image(root / name / f"{name}_{i:03d}{ext}", class_pattern(label, size, rng), mode)
    return root


@pytest.fixture
def image_folder(tmp_path):
    """A builder: image_folder({"cat": 5, "dog": 5}, size=16, ext=".png") → Path."""
    def build(classes: dict[str, int], name: str = "imgs", **kw) -> Path:
        return make_image_folder(tmp_path / name, classes, **kw)
    return build


# --------------------------------------------------------------------------- a trained run

TINY_RUN_OVERRIDES = {
    "data.max_per_class": 30,  # 300 Animal-Shape images: 210 train / 45 val / 45 test
    "data.batch_size": 32,
    "train.epochs": 2,
    "train.seed": 0,
}


def fit_run(overrides, out=None, config=None, **kw):
    """`cnnlab.api.train`, silent and (where supported) without the plots / HTML report, which
    test_report covers; the function is taken from cnnlab.api because the package attributes
    `cnnlab.train` / `cnnlab.predict` collide with the subpackage / submodule of those names
    (see test_runs_cli.py::test_package_api_names_stay_functions)."""
    from cnnlab.api import train

    kw.setdefault("quiet", True)
    if "report" in inspect.signature(train).parameters:
        kw.setdefault("report", False)
    return train(config, overrides, out=out, **kw)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cnnlab_cache):
    """One small harahap-cnn run on Animal-Shape, shared by the run-folder / CLI tests (read-only!).
    Trained with the library's defaults (report included), as a user's run would be."""
    from cnnlab.api import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train(None, dict(TINY_RUN_OVERRIDES, name="tiny"), out=out, quiet=True)


def finished(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """A started process (stdout and stderr piped) waited for, killed if it outlives `timeout` or the wait is
    interrupted; its output as subprocess.run gives it. Lets a test start independent processes at once."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------- a tiny study

@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, cnnlab_cache):
    """recipes/tiny-study.yaml (2 variants × 2 seeds) run once by the local executor, 2 runs at once. Shared by
    test_compare (which reruns some of its runs: they end the same, bit for bit) and test_ray (the Ray executor
    must give the same runs)."""
    from cnnlab.study import run_study

    out = tmp_path_factory.mktemp("studies") / "tiny"
    return run_study(RECIPES / "tiny-study.yaml", jobs=2, out=out, quiet=True)


# --------------------------------------------------------------------------- a PostgreSQL server

@pytest.fixture(scope="session")
def postgres_url():
    """The SQLAlchemy URL (postgresql+psycopg2://postgres@127.0.0.1:PORT/cnnlab, trust auth on
    127.0.0.1 only) of a throwaway PostgreSQL server started for this session (tests/pgserver.py;
    as the `postgres` user when running as root), stopped and deleted at the end.
    Skips without the PostgreSQL binaries or psycopg2, but fails when CI=true (.ci/run installs them)."""
    import os

    from pgserver import missing_reason, postgres_server

    def missing(why):
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL test server cannot run on CI: {why}")
        pytest.skip(why)

    try:
        import psycopg2  # noqa: F401  (the driver SQLAlchemy / Optuna use for the URL)
    except ImportError:
        missing("psycopg2 is not installed (pip install psycopg2-binary)")
    why = missing_reason()
    if why:
        missing(why)
    with postgres_server() as url:
        yield url
