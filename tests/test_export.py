"""`cnnlab export` (ONNX) and `cnnlab predict --onnx`: real exports, real ONNX Runtime, real images.

One tiny harahap-cnn run is trained and exported for the module; every registered model is exported at a
small input size with random weights and checked against PyTorch; three small test-only models (registered
for the test, removed after) drive the exporter fallback, a parity failure and a model no exporter takes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import fit_run

import onnx  # the [onnx] extra is part of the test install (Makefile): a missing package fails, never skips
import onnxruntime as ort

from cnnlab import cli
from cnnlab.export import (EXPORT_JSON, MIN_AGREEMENT, ONNX_FILE, TOLERANCE, export_model, export_summary,
                           onnx_logits, predict_onnx, read_metadata, session)
from cnnlab.models import MODELS, create_model, list_models
from cnnlab.runs import MODEL_FILE, load_run, read_model_meta, save_model

pytestmark = pytest.mark.filterwarnings("ignore")

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
TINY = {"data.max_per_class": 20, "data.batch_size": 32, "train.epochs": 1, "train.seed": 0, "name": "onnx",
        "train.precision": "32"}  # evaluated in float32, as the export's parity check: the same accuracy


def cnnlab(*argv, capsys) -> tuple[int, str, str]:
    """`cnnlab ARGV` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str, code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith("cnnlab: error: "), (rc, err)
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cnnlab_cache):
    """A tiny trained run (20 Animal-Shape images a class, 1 epoch), exported with `cnnlab export`."""
    out = tmp_path_factory.mktemp("onnx") / "run"
    fit_run(TINY, out=out, config=DEMO)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["export", str(out)])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def test_images(exported, tmp_path_factory):
    """Five of the run's test images as PNG files, one RGB JPEG of another size, one broken file."""
    run_dir, _ = exported
    run = load_run(run_dir)
    from cnnlab.data import load_data

    ds = load_data(run.config.data, progress=False)
    folder = tmp_path_factory.mktemp("imgs")
    for j, i in enumerate(run.split["test"][:5]):
        Image.fromarray(ds.images[i][0].numpy(), "L").save(folder / f"test_{j}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (41, 57, 3), dtype=np.uint8), "RGB").save(folder / "photo.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


# --------------------------------------------------------------------------- the run: export and parity

def test_export_writes_the_model_and_proves_parity(exported):
    run_dir, printed = exported
    run = load_run(run_dir)
    r = json.loads((run_dir / EXPORT_JSON).read_text())
    n_test = len(run.split["test"])
    assert r["passed"] is True and r["failure"] is None
    assert r["file"] == ONNX_FILE and r["format"] == "onnx"
    data = (run_dir / ONNX_FILE).read_bytes()
    assert r["size_bytes"] == len(data) and r["sha256"] == hashlib.sha256(data).hexdigest()
    assert r["exporter"] == "dynamo" and r["exporter_fallback_reason"] is None
    assert r["exporter_capture"].startswith("torch.export")
    assert r["opset"] == next(o.version for o in onnx.load_from_string(data).opset_import if o.domain == "")
    assert r["evaluated_on"] == "test" and r["n_images"] == n_test > 0
    assert r["tolerance"] == TOLERANCE and r["min_top1_agreement"] == MIN_AGREEMENT
    assert r["max_prob_diff"] <= TOLERANCE and r["top1_agreement"] >= MIN_AGREEMENT
    assert r["accuracy_onnx"] == pytest.approx(r["accuracy_torch"], abs=1 / n_test)
    # the PyTorch side is the run's own evaluation: the accuracy metrics.json recorded (fp32, no TTA)
    assert r["accuracy_torch"] == pytest.approx(run.metrics["accuracy"]) == r["accuracy_recorded"]
    assert r["notes"] == []
    assert 1 in r["batch_sizes"]
    for pkg in ("torch", "onnx", "onnxruntime", "onnxscript", "cnnlab"):
        assert r["versions"][pkg]
    assert f"→ {run_dir / ONNX_FILE}" in printed and "passed" in printed and "top-1 agreement 100.00 %" in printed
    assert not (run_dir / (ONNX_FILE + ".failed")).exists()


def test_onnx_file_has_a_dynamic_batch_and_its_metadata(exported):
    run_dir, _ = exported
    run = load_run(run_dir)
    meta = read_model_meta(run_dir / MODEL_FILE)
    sess = ort.InferenceSession(str(run_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, outp.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28] and inp.type == "tensor(float)"
    got = read_metadata(sess)
    assert got["classes"] == meta["classes"] and got["image_size"] == meta["image_size"] == 28
    assert got["in_channels"] == meta["in_channels"] == 1
    assert got["mean"] == meta["mean"] and got["std"] == meta["std"] and got["resize"] == meta["resize"]
    assert got["model"] == "harahap-cnn" and got["source_run"] == str(run_dir) and got["exporter"] == "dynamo"
    assert got["opset"] == json.loads((run_dir / EXPORT_JSON).read_text())["opset"]
    assert got["cnnlab_version"] == __import__("cnnlab").__version__
    assert "normalised" in got["input"] and "softmax" in got["output"]

    from cnnlab.data import load_data
    from cnnlab.data.loader import Normalizer

    ds = load_data(run.config.data, progress=False)
    x = Normalizer(meta["mean"], meta["std"])(ds.images[torch.tensor(run.split["test"][:7])])
    model = run.model.eval()
    for n in (1, 7):  # batch sizes other than the exporter's example (2)
        logits = sess.run(None, {"input": x[:n].numpy()})[0]
        assert logits.shape == (n, len(meta["classes"]))
        with torch.no_grad():
            want = model(x[:n])
        assert np.abs(logits - want.numpy()).max() < 1e-4


def test_predict_onnx_equals_pytorch_predict(exported, test_images, capsys):
    from cnnlab.api import predict

    run_dir, _ = exported
    want = predict(run_dir, [test_images], top_k=3)
    got = predict_onnx(run_dir / ONNX_FILE, [test_images], top_k=3)
    assert [r["file"] for r in got] == [r["file"] for r in want] and len(got) == 7
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        if "error" in w:
            assert g["error"] == w["error"]
            continue
        assert [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]]
        assert np.allclose([t["probability"] for t in g["top"]], [t["probability"] for t in w["top"]], atol=2e-6)

    # the command line: the same table, by ONNX Runtime (default RUN/model.onnx, or --onnx FILE), exit 1 as
    # the PyTorch path for the broken file
    rc_t, out_t, _ = cnnlab("predict", run_dir, test_images, capsys=capsys)
    rc_o, out_o, _ = cnnlab("predict", run_dir, test_images, "--onnx", capsys=capsys)
    rc_f, out_f, _ = cnnlab("predict", run_dir, test_images, "-k", "2", "--onnx", run_dir / ONNX_FILE, capsys=capsys)
    assert rc_t == rc_o == rc_f == 1
    lines_t, lines_o = out_t.splitlines(), out_o.splitlines()
    assert len(lines_t) == len(lines_o) == 7 and len(out_f.splitlines()) == 7
    for a, b in zip(lines_t, lines_o):
        ta, tb = a.split(), b.split()
        assert ta[0] == tb[0] and ta[1::2] == tb[1::2], (a, b)  # file, classes (or ERROR: …)
        if "ERROR:" not in a:
            assert np.allclose([float(v) for v in ta[2::2]], [float(v) for v in tb[2::2]], atol=1.5e-3)
        assert a.index(ta[1]) == b.index(tb[1])  # same column layout
    rc, out, _ = cnnlab("predict", run_dir, test_images / "test_0.png", "--onnx", "--json", capsys=capsys)
    first = next(w for w in want if w["file"].endswith("test_0.png"))
    assert rc == 0 and json.loads(out)[0]["top"][0]["class"] == first["top"][0]["class"]


def test_report_page_shows_the_export(exported):
    from cnnlab.report.folders import load_run_folder
    from cnnlab.report.html import run_page

    run_dir, _ = exported
    ok, text = export_summary(run_dir)
    assert ok and "Exported to ONNX: model.onnx" in text and "top-1 agreement 100.00 %" in text
    assert "torch.onnx.export(dynamo=True)" in text
    page = run_page(load_run_folder(run_dir), {}, [], [])
    assert "Exported to ONNX: model.onnx" in page


# --------------------------------------------------------------------------- errors: one line, nothing written

def _snapshot(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_export_errors_are_one_line_and_write_nothing(exported, tmp_path, capsys, monkeypatch):
    run_dir, _ = exported
    rc, _, err = cnnlab("export", tmp_path / "nowhere", capsys=capsys)
    assert "is not a run folder" in one_error_line(rc, err)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns(MODEL_FILE, ONNX_FILE, EXPORT_JSON))
    before = _snapshot(unfinished)
    rc, _, err = cnnlab("export", unfinished, capsys=capsys)
    assert f"has no {MODEL_FILE}" in one_error_line(rc, err)
    assert _snapshot(unfinished) == before

    before = _snapshot(run_dir)
    rc, _, err = cnnlab("export", run_dir, "--out", tmp_path / "no" / "such" / "m.onnx", capsys=capsys)
    assert "does not exist" in one_error_line(rc, err)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        cnnlab("export", run_dir, "--format", "tflite", capsys=capsys)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err

    # a package missing (its import fails): the pip command, nothing touched
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    rc, _, err = cnnlab("export", run_dir, capsys=capsys)
    assert "pip install 'cnnlab[onnx]'" in one_error_line(rc, err) and "onnxscript" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rc, _, err = cnnlab("predict", run_dir, run_dir, "--onnx", capsys=capsys)
    assert "pip install 'cnnlab[onnx]'" in one_error_line(rc, err)
    monkeypatch.undo()
    assert _snapshot(run_dir) == before

    # predict --onnx: no exported model; a file that is not ONNX; an ONNX file without cnnlab's metadata
    rc, _, err = cnnlab("predict", unfinished, run_dir, "--onnx", capsys=capsys)
    assert "cnnlab export" in one_error_line(rc, err)
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    rc, _, err = cnnlab("predict", run_dir, run_dir, "--onnx", tmp_path / "junk.onnx", capsys=capsys)
    assert "ONNX Runtime cannot load it" in one_error_line(rc, err)
    bare = onnx.load(run_dir / ONNX_FILE)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    rc, _, err = cnnlab("predict", run_dir, run_dir, "--onnx", tmp_path / "bare.onnx", capsys=capsys)
    assert "no cnnlab metadata" in one_error_line(rc, err)


# --------------------------------------------------------------------------- the fallback and failures, for real

class _Checked(nn.Module):
    """Validates its input with a data-dependent `if`: torch.export refuses it, the TorchScript trace is right."""

    def __init__(self, k, c, s):
        super().__init__()
        self.backbone, self.head = nn.Flatten(), nn.Linear(c * s * s, k)

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        return self.head(self.backbone(x))


class _BatchDependent(_Checked):
    """Answers differently for batches above 2 (a bug). The exporter captures only the example's branch (batch
    2) and still marks the batch axis dynamic: torch.export's capture with size-oblivious guards (torch 2.14)
    specialises the `if` without a word, as a TorchScript trace would. Only the parity check can tell."""

    def forward(self, x):
        z = self.head(self.backbone(x))
        return z if x.shape[0] <= 2 else -z


class _Svd(_Checked):
    """Singular values as features: neither exporter has an ONNX translation for SVD."""

    def __init__(self, k, c, s):
        super().__init__(k, c, s)
        self.head = nn.Linear(s, k)

    def forward(self, x):
        return self.head(torch.linalg.svdvals(x[:, 0]))


@pytest.fixture
def test_models():
    names = {"test-checked": _Checked, "test-batch-dependent": _BatchDependent, "test-svd": _Svd}
    for name, cls in names.items():
        MODELS.register(name, doc="test only")(
            lambda num_classes, in_channels=1, image_size=28, cls=cls: cls(num_classes, in_channels, image_size))
    yield list(names)
    for name in names:
        for table in (MODELS._builders, MODELS._docs, MODELS.info):
            table.pop(name, None)


def _run_with_model(src: Path, dst: Path, name: str) -> Path:
    """A copy of run `src` (config, split, metrics) whose model.safetensors holds a `name` model."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(ONNX_FILE, EXPORT_JSON, "*.failed"))
    meta = read_model_meta(src / MODEL_FILE)
    torch.manual_seed(0)
    model = create_model(name, meta["num_classes"], meta["in_channels"], meta["image_size"])
    save_model(dst / MODEL_FILE, model, dict(meta, model=name, options={}))
    return dst


def test_fallback_exporter_is_used_and_recorded(exported, test_models, tmp_path, capsys):
    run_dir = _run_with_model(exported[0], tmp_path / "checked", "test-checked")
    split = json.loads((run_dir / "split.json").read_text())
    (run_dir / "split.json").write_text(json.dumps(dict(split, test=[])))  # a run without a test split: val
    elsewhere = tmp_path / "elsewhere.onnx"  # --out outside the run folder: export.json stays in the run
    rc, out, err = cnnlab("export", run_dir, "--out", elsewhere, capsys=capsys)
    assert rc == 0, err
    r = json.loads((run_dir / EXPORT_JSON).read_text())
    assert r["file"] == str(elsewhere) and elsewhere.is_file() and not (run_dir / ONNX_FILE).exists()
    assert r["evaluated_on"] == "val" and r["n_images"] == len(split["val"]) and r["top1_agreement"] == 1.0
    assert r["passed"] and r["exporter"] == "torchscript" and r["exporter_call"] == "torch.onnx.export(dynamo=False)"
    assert "data-dependent" in r["exporter_fallback_reason"] and "TorchExportError" in r["exporter_fallback_reason"]
    assert "TorchScript exporter (dynamo=False), because dynamo=True failed" in out
    assert read_metadata(session(elsewhere))["exporter"] == "torchscript"
    assert export_summary(run_dir)[0] is True


def test_parity_failure_keeps_nothing_that_looks_valid(exported, test_models, tmp_path, capsys):
    run_dir = _run_with_model(exported[0], tmp_path / "buggy", "test-batch-dependent")
    (run_dir / ONNX_FILE).write_bytes((exported[0] / ONNX_FILE).read_bytes())  # an older export, now stale
    rc, out, err = cnnlab("export", run_dir, capsys=capsys)
    line = one_error_line(rc, err, code=1)
    assert "does not match the PyTorch model" in line and ".failed" in line
    assert not (run_dir / ONNX_FILE).exists() and (run_dir / (ONNX_FILE + ".failed")).is_file()
    r = json.loads((run_dir / EXPORT_JSON).read_text())
    assert r["passed"] is False and r["file"] == ONNX_FILE + ".failed"
    assert r["max_prob_diff"] > TOLERANCE and r["top1_agreement"] < MIN_AGREEMENT and "FAILED" in out
    assert export_summary(run_dir)[0] is False


def test_a_model_no_exporter_takes_is_one_error_line(exported, test_models, tmp_path, capsys):
    run_dir = _run_with_model(exported[0], tmp_path / "svd", "test-svd")
    before = _snapshot(run_dir)
    rc, _, err = cnnlab("export", run_dir, capsys=capsys)
    line = one_error_line(rc, err)
    assert "cannot export test-svd" in line and "dynamo=True" in line and "TorchScript exporter" in line
    assert "svd" in line.lower()
    assert _snapshot(run_dir) == before


# --------------------------------------------------------------------------- every registered model

def _size(name: str) -> int:
    return 64 if name.startswith("resnet") else 32  # ResNets: their ImageNet stem (≥ 64 px), the rest: small


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports(name):
    """Random weights (non-trivial batch-norm statistics), a small input: ONNX Runtime's logits = PyTorch's."""
    size, channels = _size(name), 3
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    meta = {"model": name, "classes": [f"c{i}" for i in range(5)], "image_size": size, "in_channels": channels,
            "mean": [0.5] * channels, "std": [0.25] * channels, "resize": "stretch"}
    data, info = export_model(model, meta)
    assert info["exporter"] in ("dynamo", "torchscript") and info["opset"]
    assert (info["exporter_fallback_reason"] is None) == (info["exporter"] == "dynamo")
    sess = session(data)
    got = read_metadata(sess)
    assert got["model"] == name and got["classes"] == meta["classes"] and got["image_size"] == size
    assert got["mean"] == meta["mean"] and got["std"] == meta["std"] and got["in_channels"] == channels
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    for batch in (x[:1], x):
        with torch.no_grad():
            want = model(batch)
        out = onnx_logits(sess, batch)
        assert out.shape == want.shape
        # float32 through up to 50 layers: relative to the logits' scale (see export.TOLERANCE)
        assert (out - want).abs().max().item() <= TOLERANCE * max(1.0, want.abs().max().item()), name
