"""`cnnlab export`: a run's model as an ONNX file, with proof that ONNX Runtime answers as PyTorch does.

    cnnlab export runs/demo                     → runs/demo/model.onnx + runs/demo/export.json
    cnnlab predict runs/demo photo.png --onnx   → classified by ONNX Runtime from the file alone

What is exported: the saved model (model.safetensors) in eval mode, float32, channels-first, on the CPU, with
the fused training blocks turned off (`set_fusion(model, False)`), so the graph holds the plain ReLU /
BatchNorm / MaxPool operators. Exporter: PyTorch's current one, `torch.onnx.export(dynamo=True)`
(torch.export → ONNX through onnxscript); only when it fails, the TorchScript-based one (`dynamo=False`).
export.json says which was used and, for the fallback, why the first failed.

The graph's input is `input`, float32 (N, C, H, W), **already normalised** — normalisation is not in the
graph. A consumer decodes the image as cnnlab does (upright by EXIF, first frame, converted to C channels,
resized to image_size² bilinearly: stretched, or center-cropped when `resize` says so), then computes
x = pixel / 255 · (1 / std) − mean / std per channel, with mean / std in [0, 1] pixel units. Everything needed
for that is in the file's metadata (`metadata_props`): classes (JSON), image_size, in_channels, mean, std
(JSON), resize, and the text of `input` / `output`. The output `logits` is float32 (N, classes), in the
order of `classes`; softmax gives the probabilities. The batch axis is dynamic (any N ≥ 1).

Parity: before anything is written, ONNX Runtime (CPUExecutionProvider, default session options) and the
PyTorch model (float32, eval) classify the run's whole evaluation split — the test split, or the
validation split when the run had none, rebuilt exactly as `cnnlab eval` does — from the same input
tensors, in batches (and one batch of a single image: the dynamic axis). The export passes when the
largest difference of any softmax probability is within the tolerance and the top-1 class agrees on at
least 99.9 % of the images. Then model.onnx is written; otherwise the graph is kept only as
`model.onnx.failed` (never under a name that looks valid, and an older model.onnx is removed) and the
command fails. export.json records the numbers either way.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .runs import MODEL_FILE, Run, RunError, load_run, read_json, write_json

if TYPE_CHECKING:
    import torch

ONNX_FILE = "model.onnx"
EXPORT_JSON = "export.json"
FAILED_SUFFIX = ".failed"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
FORMATS = ("onnx",)
INSTALL_HINT = "pip install 'cnnlab[onnx]'"

# Largest |p_onnx − p_torch| allowed over every class probability of every image. Both sides compute in
# float32 (unit roundoff 6e-8) but not with the same kernels: ONNX Runtime folds batch norm into the
# convolutions and sums in another order, which moves logits by ~1e-7 relative per layer — measured
# 1e-8…3e-7 for the papers' nets and ≤ 3e-5 on logits of ±23 for a random-init ResNet-50. A probability
# moves by at most half the largest logit change (the softmax Jacobian's ∞-norm is ≤ 1/2), so 1e-4 is
# ~100× above that noise for trained models, yet 10× below the 3 decimals `cnnlab predict` prints: a
# wrong operator, a lost normalisation or a mis-traced branch moves probabilities by 1e-2 or more.
TOLERANCE = 1e-4
# Top-1 classes must agree on ≥ 99.9 % of the images: with the probabilities within TOLERANCE, only an
# image whose two best classes are within 2·TOLERANCE of each other (a near tie) can flip.
MIN_AGREEMENT = 0.999
INPUT_DOC = ("float32 (N, C, H, W), normalised outside the graph: x = pixel / 255 · (1 / std) − mean / std per "
             "channel (mean, std in [0, 1] pixel units); pixels decoded as cnnlab does: upright by EXIF, first "
             "frame, converted to in_channels (L or RGB), resized to image_size × image_size bilinearly "
             "(resize: stretch, or center-crop)")
OUTPUT_DOC = "float32 (N, classes) logits in the order of `classes`; softmax gives the probabilities"


class ExportError(RuntimeError):
    """A model that cannot be exported or run, or a missing package; the message says which and why."""


class ParityError(ExportError):
    """The ONNX model does not answer as the PyTorch model does; `report` is what export.json records."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def require(modules: tuple[str, ...], what: str) -> list:
    """The modules imported, or one ExportError naming the missing ones and the pip command."""
    got, missing = [], []
    for name in modules:
        try:
            got.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}, not installed here: {INSTALL_HINT}")
    return got


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

    out = {"cnnlab": __version__}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------- PyTorch → ONNX

@contextlib.contextmanager
def _captured(log: list[str]):
    """The exporters' progress lines, warnings and C++ graph dumps kept off the terminal (appended to `log`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        text = io.StringIO()
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            log.append(text.getvalue() + sink.read().decode("utf-8", "replace"))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(e: BaseException) -> str:
    """An exporter's exception in one line: its summary, not its advice or its stack."""
    text = _ANSI.sub("", str(e))
    m = re.search(r"## Exception summary\s*\n\s*(\S.*)", text)
    line = m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", line.strip())
    out = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return out if len(out) <= 400 else out[:397] + "…"


def to_onnx(model, in_channels: int, image_size: int, opset: int | None = None, prefer: str = "dynamo"):
    """`model` as an onnx.ModelProto with a dynamic batch axis, and {exporter, exporter_fallback_reason}.

    The model is copied (the caller's is untouched) and exported in eval mode, float32, channels-first,
    on the CPU, fused blocks off. prefer="dynamo" (`cnnlab export`): `torch.onnx.export(dynamo=True)` first,
    the TorchScript exporter (`dynamo=False`) only if it fails; prefer="torchscript" (the feature engine's
    one-off export): the other order — ~1 s against ~6–10 s for EfficientNet-Lite0 on 2 cores, and as fast
    in ONNX Runtime once onnxscript's optimiser has folded its shape arithmetic and fused its patterns.
    """
    import torch

    onnx, _ = require(("onnx", "onnxscript"), "cnnlab export")
    from .models import set_fusion

    model = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    set_fusion(model, False)
    # batch 2: torch.export would specialise a batch of 1 to the constant 1
    example = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    log: list[str] = []

    def dynamo():
        with _captured(log), torch.no_grad():
            program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, optimize=True,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        # how torch.export captured the graph (its progress lines): strict / non-strict / draft_export
        captured = re.findall(r"with `([^`]+)`\.\.\. ✅", log[-1])
        return program.model_proto, {"exporter": "dynamo", "exporter_capture": captured[-1] if captured else None}

    def torchscript():
        import onnxscript.optimizer
        import onnxscript.rewriter

        buf = io.BytesIO()
        with _captured(log), torch.no_grad():
            torch.onnx.export(model, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            # what the dynamo exporter's optimize=True does: constants folded, Conv+BN / Pad+Conv fused
            proto = onnxscript.optimizer.optimize(onnx.load_from_string(buf.getvalue()))
            proto = onnxscript.optimizer.optimize(onnxscript.rewriter.rewrite(proto))
        return proto, {"exporter": "torchscript", "exporter_capture": "torch.jit.trace"}

    order = (dynamo, torchscript) if prefer == "dynamo" else (torchscript, dynamo)
    try:
        proto, info = order[0]()
        return proto, {**info, "exporter_fallback_reason": None}
    except Exception as e:  # torch.export / translation / optimisation failed: the exporter says why
        first = one_line(e)
    try:
        proto, info = order[1]()
    except Exception as e:
        name = getattr(model, "registry_name", type(model).__name__)
        said = {"dynamo": "torch.onnx.export(dynamo=True)", "torchscript": "the TorchScript exporter (dynamo=False)"}
        raise ExportError(f"cannot export {name} to ONNX: {said[order[0].__name__]} failed ({first}); "
                          f"{said[order[1].__name__]} failed too ({one_line(e)})") from None
    return proto, {**info, "exporter_fallback_reason": first}


def opset_of(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def model_metadata(meta: dict, info: dict, opset: int | None, source_run: str | None = None) -> dict[str, str]:
    """The file's metadata_props (all strings): everything `predict --onnx` needs, and where it came from."""
    from ._version import __version__

    return {
        "cnnlab_version": __version__,
        "source_run": str(source_run or ""),
        "model": str(meta.get("model", "")),
        "model_options": json.dumps(meta.get("options", {})),
        "classes": json.dumps(list(meta["classes"]), ensure_ascii=False),
        "image_size": str(int(meta["image_size"])),
        "in_channels": str(int(meta["in_channels"])),
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "resize": str(meta.get("resize", "stretch")),
        "normalization": "outside the graph (the input is already normalised)",
        "input": f"{INPUT_NAME}: {INPUT_DOC}",
        "output": f"{OUTPUT_NAME}: {OUTPUT_DOC}",
        "opset": str(opset),
        "exporter": info["exporter"],
    }


def export_model(model, meta: dict, opset: int | None = None, source_run: str | None = None) -> tuple[bytes, dict]:
    """A model and its run metadata (classes, image_size, in_channels, mean, std, resize, model) → the ONNX
    file's bytes (metadata_props included) and {exporter, exporter_fallback_reason, opset, ir_version}."""
    proto, info = to_onnx(model, int(meta["in_channels"]), int(meta["image_size"]), opset)
    info["opset"] = opset_of(proto)
    info["ir_version"] = int(proto.ir_version)
    del proto.metadata_props[:]
    for k, v in model_metadata(meta, info, info["opset"], source_run).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = (f"cnnlab {meta.get('model', 'model')}: {len(meta['classes'])} classes; "
                        f"input {INPUT_NAME}: {INPUT_DOC}; output {OUTPUT_NAME}: {OUTPUT_DOC}")
    try:
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit: no cnnlab model comes near it
        raise ExportError(f"the ONNX model is too large for one file ({e})") from None
    return data, info


# --------------------------------------------------------------------------- ONNX Runtime

def session(source, what: str = "the ONNX model", threads: int | None = None):
    """An ONNX Runtime CPU session from a file path or the model's bytes; threads: its intra-op threads, which
    then sleep between runs instead of spinning (None: ONNX Runtime's defaults)."""
    (ort,) = require(("onnxruntime",), "running an ONNX model")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{what}: ONNX Runtime cannot load it ({one_line(e)})") from None


def read_metadata(sess, what: str = "the ONNX model") -> dict:
    """The cnnlab metadata of an ONNX model (its session), parsed: classes, image_size, in_channels, mean, std…"""
    props = dict(sess.get_modelmeta().custom_metadata_map)
    needed = ("classes", "image_size", "in_channels", "mean", "std")
    missing = [k for k in needed if k not in props]
    if missing:
        raise ExportError(f"{what} has no cnnlab metadata ({', '.join(missing)} missing): only a file written by "
                          "`cnnlab export` carries its classes, input size and normalisation")
    try:
        out = dict(props, classes=json.loads(props["classes"]), image_size=int(props["image_size"]),
                   in_channels=int(props["in_channels"]), mean=json.loads(props["mean"]),
                   std=json.loads(props["std"]), resize=props.get("resize", "stretch"))
        out["opset"] = int(props["opset"]) if props.get("opset", "None") != "None" else None
    except (ValueError, TypeError) as e:
        raise ExportError(f"{what}: its cnnlab metadata is damaged ({e})") from None
    return out


def onnx_logits(sess, x) -> torch.Tensor:
    """ONNX Runtime's logits for a normalised float32 (N, C, H, W) tensor (or array)."""
    import numpy as np
    import torch

    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(arr, dtype=np.float32)})[0])


# --------------------------------------------------------------------------- parity on the run's images

def check_parity(run: Run, model, sess, meta: dict, tolerance: float = TOLERANCE,
                 batch_size: int | None = None) -> dict:
    """ONNX Runtime vs PyTorch (float32, eval) on the run's whole evaluation split, as `cnnlab eval` builds
    it: load_data(cfg.data) + split.json's indices, the model file's normaliser. Same input tensors."""
    import torch

    from .data import DataError
    from .data.loader import Normalizer
    from .models import set_fusion

    split = run.split
    idx = split.get("test") or split.get("val") or []
    part = "test" if split.get("test") else "val"
    if not idx:
        raise ExportError(f"{run.path}: split.json has no test or validation images to check parity on")
    try:
        ds = run.data()
    except DataError as e:
        raise ExportError(f"cannot check parity: the run's data could not be loaded as it was ({e}); the check "
                          f"needs the run's {part} images") from None
    t = torch.tensor(idx, dtype=torch.int64)
    images, labels = ds.images[t], ds.labels[t]
    norm = Normalizer(meta["mean"], meta["std"])
    model = model.to("cpu", torch.float32).eval()
    set_fusion(model, False)
    n, k = len(idx), len(meta["classes"])
    bs = int(batch_size or run.config.data.eval_batch_size or 256)
    max_p = max_l = 0.0
    agree = right_t = right_o = 0
    sizes = set()

    def compare(x):
        nonlocal max_p, max_l
        with torch.no_grad():
            lt = model(x).float()
        try:
            lo = onnx_logits(sess, x).float()
        except Exception as e:  # onnxruntime's own exception types
            raise ExportError(f"ONNX Runtime cannot run the exported model on a batch of {len(x)} "
                              f"({one_line(e)})") from None
        if lo.shape != lt.shape:
            raise ExportError(f"the ONNX model's output has shape {tuple(lo.shape)}, PyTorch's {tuple(lt.shape)}")
        sizes.add(len(x))
        pt, po = torch.softmax(lt, 1), torch.softmax(lo, 1)
        dp, dl = (po - pt).abs().max().item(), (lo - lt).abs().max().item()
        nan = float("nan")  # a non-finite output must fail the check, and max() would drop a NaN
        max_p = max(max_p, dp) if dp == dp and max_p == max_p else nan
        max_l = max(max_l, dl) if dl == dl and max_l == max_l else nan
        return pt.argmax(1), po.argmax(1)

    compare(norm(images[:1]))  # a batch of one: the batch axis is dynamic
    for s in range(0, n, bs):
        top_t, top_o = compare(norm(images[s:s + bs]))
        y = labels[s:s + bs]
        agree += int((top_t == top_o).sum())
        right_t += int((top_t == y).sum())
        right_o += int((top_o == y).sum())
    agreement = agree / n
    passed = bool(max_p <= tolerance and agreement >= MIN_AGREEMENT)
    return {"evaluated_on": part, "n_images": n, "classes": k, "batch_sizes": sorted(sizes),
            "provider": "CPUExecutionProvider", "max_prob_diff": max_p, "max_logit_diff": max_l,
            "top1_agreement": agreement, "top1_disagreements": n - agree, "tolerance": tolerance,
            "min_top1_agreement": MIN_AGREEMENT, "accuracy_torch": right_t / n, "accuracy_onnx": right_o / n,
            "passed": passed}


def _shown(path: Path, run_dir: Path) -> str:
    """A path as export.json records it: relative to the run folder when inside it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(run_dir)))
    except ValueError:
        return str(Path(os.path.abspath(path)))


def _failure(p: dict) -> str:
    why = []
    if not p["max_prob_diff"] <= p["tolerance"]:
        why.append(f"largest probability difference {p['max_prob_diff']:.3g} > tolerance {p['tolerance']:g}")
    if p["top1_agreement"] < p["min_top1_agreement"]:
        why.append(f"top-1 agreement {100 * p['top1_agreement']:.2f} % < {100 * p['min_top1_agreement']:.1f} % "
                   f"({p['top1_disagreements']} of {p['n_images']} images differ)")
    return "; ".join(why)


def export_run(run: Run | str | Path, out: str | Path | None = None, *, fmt: str = "onnx",
               tolerance: float = TOLERANCE, opset: int | None = None, batch_size: int | None = None) -> dict:
    """Export a run's model to ONNX (default RUN/model.onnx) and prove parity on its evaluation split.

    Returns what export.json records. The .onnx file is written only when parity holds; when it does not,
    the graph is kept as `<out>.failed`, export.json says why (passed: false), and ParityError is raised.
    Anything that fails earlier (not a run, no model file, packages missing, a model no exporter takes)
    raises RunError / ExportError and writes nothing.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; cnnlab exports: {', '.join(FORMATS)}")
    if not tolerance > 0:
        raise ExportError(f"the tolerance must be a positive number; got {tolerance}")
    run = run if isinstance(run, Run) else load_run(run)
    if not (run.path / MODEL_FILE).is_file():
        raise RunError(f"{run.path} has no {MODEL_FILE} (the run did not finish); nothing to export")
    read_json(run.path / "split.json")  # the parity check needs it: fail before the slow part
    require(("onnx", "onnxscript", "onnxruntime"), "cnnlab export")
    out = Path(out) if out is not None else run.path / ONNX_FILE
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / ONNX_FILE}")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist")
    failed = out.with_name(out.name + FAILED_SUFFIX)

    from .runs import build_saved_model

    model, meta = build_saved_model(run.path / MODEL_FILE)
    data, info = export_model(model, meta, opset=opset, source_run=str(run.path))
    t_export = time.perf_counter() - t0
    sess = session(data, f"the exported {meta['model']}")
    parity = check_parity(run, model, sess, meta, tolerance=tolerance, batch_size=batch_size)
    recorded = (run.metrics or {}).get("accuracy")
    notes = []  # why accuracy_torch may differ from metrics.json's accuracy (the ONNX model is the plain forward)
    if getattr(run.config.train, "tta", None) == "flip":
        notes.append("metrics.json's accuracy averaged flipped copies (train.tta=flip); both models here are the "
                     "plain forward pass")
    if (run.env or {}).get("precision") not in (None, "fp32", "32"):
        notes.append(f"metrics.json's accuracy was computed in {run.env['precision']}; both models here run in float32")
    report = {
        "format": "onnx",
        "file": _shown(out if parity["passed"] else failed, run.path),
        "passed": parity["passed"],
        "failure": None if parity["passed"] else _failure(parity),
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "opset": info["opset"],
        "ir_version": info["ir_version"],
        "exporter": info["exporter"],
        "exporter_call": f"torch.onnx.export(dynamo={info['exporter'] == 'dynamo'})",
        "exporter_capture": info["exporter_capture"],
        "exporter_fallback_reason": info["exporter_fallback_reason"],
        "model": meta["model"],
        "input": {"name": INPUT_NAME, "shape": ["batch", int(meta["in_channels"]), int(meta["image_size"]),
                                                int(meta["image_size"])], "dtype": "float32", "doc": INPUT_DOC},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta["classes"])], "dtype": "float32",
                   "doc": OUTPUT_DOC},
        **{k: v for k, v in parity.items() if k != "passed"},
        "accuracy_recorded": recorded,
        "notes": notes,
        "versions": versions(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"export": round(t_export, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    from .fileio import atomic_write_bytes

    target = out if parity["passed"] else failed
    atomic_write_bytes(target, data)
    try:
        if parity["passed"]:
            failed.unlink(missing_ok=True)  # an older failed attempt's graph
        else:
            out.unlink(missing_ok=True)  # nothing under the valid name once this model has failed its check
        write_json(run.path / EXPORT_JSON, report)
    except OSError:
        target.unlink(missing_ok=True)  # no model file without the export.json that vouches for it
        raise
    if not parity["passed"]:
        raise ParityError(f"the ONNX model does not match the PyTorch model on the {parity['evaluated_on']} split: "
                          f"{report['failure']}; not written as {out} (kept as {failed} for inspection; "
                          f"numbers in {run.path / EXPORT_JSON})", report)
    return report


def format_report(r: dict, run_dir: str | Path = ".") -> list[str]:
    """`cnnlab export`'s lines for an export.json (of the run folder `run_dir`)."""
    size = r["size_bytes"] / 1e6
    via = ("torch.onnx.export(dynamo=True)" if r["exporter"] == "dynamo" else
           f"the TorchScript exporter (dynamo=False), because dynamo=True failed: {r['exporter_fallback_reason']}")
    lines = [f"exported {r['model']} → {Path(run_dir) / r['file']} ({size:.1f} MB, opset {r['opset']}, {via})",
             f"parity on the {r['evaluated_on']} split, {r['n_images']} images, ONNX Runtime (CPU) vs PyTorch "
             f"(float32): max |Δp| {r['max_prob_diff']:.2e} (tolerance {r['tolerance']:.0e}), top-1 agreement "
             f"{100 * r['top1_agreement']:.2f} %, accuracy {r['accuracy_onnx']:.4f} (ONNX) / "
             f"{r['accuracy_torch']:.4f} (PyTorch) — {'passed' if r['passed'] else 'FAILED'}"]
    return lines


def export_summary(run_dir: str | Path) -> tuple[bool, str] | None:
    """(passed, one sentence) about RUN/export.json for the report page; None when the run was not exported."""
    path = Path(run_dir) / EXPORT_JSON
    if not path.is_file():
        return None
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        p = (f"{r['evaluated_on']} split, {r['n_images']} images: top-1 agreement {100 * r['top1_agreement']:.2f} %, "
             f"largest probability difference {r['max_prob_diff']:.1e} (tolerance {r['tolerance']:.0e})")
        if not r["passed"]:
            return False, f"ONNX export failed its parity check with PyTorch ({p}); no ONNX model was kept."
        there = (Path(run_dir) / r["file"]).is_file()  # an absolute r["file"] replaces run_dir
        return True, (f"Exported to ONNX: {r['file']} ({r['size_bytes'] / 1e6:.1f} MB, opset {r['opset']}, "
                      f"{r.get('exporter_call', r['exporter'])}, {r['exported_at']}" + ("" if there else "; the file is gone")
                      + f"). ONNX Runtime matches PyTorch on the {p}.")
    except (ValueError, KeyError, TypeError):
        return False, f"{EXPORT_JSON} is unreadable; run `cnnlab export` again."


# --------------------------------------------------------------------------- predict with the ONNX file alone

def predict_onnx(onnx_path: str | Path, paths, top_k: int = 3, batch_size: int = 256) -> list[dict]:
    """As `cnnlab.predict` ([{file, top: [{class, probability}…]} | {file, error}], input order), but by
    ONNX Runtime from the .onnx file: classes, size, channels, resize and normalisation from its metadata,
    images decoded by cnnlab's decoder; no PyTorch model is built."""
    from .inference import classify_files

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    sess = session(onnx_path, str(onnx_path))
    meta = read_metadata(sess, str(onnx_path))
    return classify_files(paths, meta, lambda x: onnx_logits(sess, x).float(), top_k, batch_size)
