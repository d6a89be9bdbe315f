"""Head-only training on a frozen backbone's features, computed once per split (a linear probe in seconds).

With `model.freeze=backbone` and nothing random before the head (no augmentation of any kind, no gradual
unfreezing, no flip TTA), every epoch would push the same images through the same frozen backbone. Here
they go through it once: each split's features (N, F) are computed in eval mode and kept on the device,
and the head trains on them like any model on any data — same loop, same checkpoints. The features are
also cached on disk (under $CNNLAB_CACHE/features), keyed by the images, the backbone's weights, the
normalisation, the precision and the engine, so the other seeds of a study skip the backbone altogether.

Engine (`train.feature_engine`): torch's eager modules, or ONNX Runtime's CPU kernels on the backbone
exported once to ONNX (cached under $CNNLAB_CACHE/onnx, keyed by the weights). ONNX Runtime computes in
fp32, and on the AVX2 Zen 3 ran EfficientNet-Lite0 at 224 px 1.96× as fast as torch's channels-last fp32
(134 against 68 images/s; BENCHMARKS.md, "Pretrained backbones — AVX2"). `auto` decides per run, on the CPU at
fp32: one chunk of the training images through both (which also checks that they agree), the faster
computes the rest; env.json says which and why. At bf16-mixed torch computes (in bf16, as asked).
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .data.dataset import cache_dir
from .data.loader import DeviceLoader, Prepared
from .export import ExportError, one_line, require, session, to_onnx
from .fileio import atomic_write_bytes
from .training import Runtime
from .training.runtime import inference_chunk


class FeatureLoader(DeviceLoader):
    """Batches of precomputed features (N, F) float, with the same order and generators as the image loader."""

    def _to_input(self, xb: torch.Tensor) -> torch.Tensor:
        return xb


def eligible(cfg) -> tuple[bool, str]:
    """(whether the head can train on features computed once, why not)."""
    d, m = cfg.data, cfg.model
    if m.freeze != "backbone":
        return False, "the backbone trains (model.freeze=none)"
    reasons = [why for on, why in ((m.unfreeze_after is not None, "model.unfreeze_after"),
                                   (d.augment, "data.augment"), (d.randaugment > 0, "data.randaugment"),
                                   (d.mixup > 0 or d.cutmix > 0, "data.mixup / data.cutmix"),
                                   (cfg.train.tta != "none", "train.tta")) if on]
    return (not reasons), ", ".join(reasons)


def _weights_hash(backbone: nn.Module):
    h = hashlib.sha256(type(backbone).__qualname__.encode())
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h


def _key(weights, loader: DeviceLoader, runtime: Runtime) -> str:
    """The features' cache key (without the engine): the backbone's weights (`_weights_hash`), the images, …"""
    h = weights.copy()
    h.update(loader.images.detach().cpu().contiguous().numpy().data)
    if getattr(loader, "indices", None) is not None:  # a streamed split: which rows of the cache
        h.update(loader.indices.numpy().data)
    h.update(repr((loader.normalizer.mean, loader.normalizer.std, str(runtime.precision), runtime.channels_last,
                   tuple(loader.images.shape))).encode())
    return h.hexdigest()[:32]


ENGINES = ("auto", "torch", "onnxruntime")
# images per ONNX Runtime pass: on the Zen 3, passes of 8, 16 and 32 measured within the VM's noise of each
# other (Lite0, Lite2; interleaved rounds, not a bench), 64 and more a little slower for Lite0
ORT_CHUNK = 16
PROBE = 16  # images the probe times each engine on
PROBE_MIN = 64  # fewer images in the run: not worth a probe, torch computes them
AGREE = 1e-3  # largest |ONNX Runtime − torch| of a feature, relative to the largest feature (fp32: ~1e-6)


class TorchFeatures:
    """The frozen backbone through torch (eager, the run's precision and memory format)."""

    name = "torch"

    def __init__(self, backbone: nn.Module, runtime: Runtime):
        self.backbone, self.runtime = backbone.eval(), runtime

    @torch.no_grad()
    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        out = []
        for x in xb.split(inference_chunk(self.backbone, xb, self.runtime)):  # passes under glibc's mmap limit
            with self.runtime.autocast():
                out.append(self.backbone(x).float())
        return torch.cat(out)


class OnnxFeatures:
    """The frozen backbone as an ONNX Runtime CPU session (fp32): (N, C, H, W) normalised → (N, F) float32.

    The graph is exported once per backbone (weights, input shape) and cached as a file; the session runs
    with the run's threads and without spinning between passes (its threads would take the cores from
    torch's when the head trains)."""

    name = "onnxruntime"

    def __init__(self, backbone: nn.Module, in_channels: int, image_size: int, threads: int):
        require(("onnx", "onnxscript", "onnxruntime"), "train.feature_engine=onnxruntime")
        what = f"the exported {type(backbone).__name__}"
        try:
            self.session = session(onnx_backbone(backbone, in_channels, image_size), what, threads)
        except ExportError:  # a damaged file in the cache: exported again, once
            _onnx_path(backbone, in_channels, image_size).unlink(missing_ok=True)
            self.session = session(onnx_backbone(backbone, in_channels, image_size), what, threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        try:
            out = [self.session.run(None, {self.input: x.float().contiguous().numpy()})[0]
                   for x in xb.split(ORT_CHUNK)]
        except Exception as e:  # onnxruntime's own exception types
            raise ExportError(f"ONNX Runtime cannot run the exported backbone ({one_line(e)})") from None
        return torch.from_numpy(np.concatenate(out)).to(xb.device)


def _onnx_path(backbone: nn.Module, in_channels: int, image_size: int):
    h = _weights_hash(backbone)
    h.update(repr((in_channels, image_size, __version__, torch.__version__)).encode())
    return cache_dir() / "onnx" / f"{type(backbone).__name__}-{h.hexdigest()[:32]}.onnx"


def onnx_backbone(backbone: nn.Module, in_channels: int, image_size: int) -> bytes:
    """The backbone as ONNX bytes (dynamic batch axis), exported once and kept under $CNNLAB_CACHE/onnx."""
    path = _onnx_path(backbone, in_channels, image_size)
    if path.is_file():
        return path.read_bytes()
    proto, _ = to_onnx(backbone, in_channels, image_size, prefer="torchscript")
    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return data


def _rate(fn, x: torch.Tensor) -> float:
    """Images/s of fn on x: one warm pass (kernels picked, memory mapped), then the best of two timed ones."""
    fn(x)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def choose_engine(backbone: nn.Module, sample: torch.Tensor, n_images: int, runtime: Runtime, wanted: str = "auto"):
    """(the engine that computes the features, why): `wanted` taken as it is, or for "auto" decided here.

    sample: one batch of the run's normalised images. train.feature_engine=onnxruntime where it cannot run
    (CUDA, bf16, onnxruntime missing, an export that fails, a graph that disagrees with torch) is an error."""
    if wanted not in ENGINES:
        raise ValueError(f"train.feature_engine={wanted!r}: one of {', '.join(ENGINES)}")
    torch_engine = TorchFeatures(backbone, runtime)
    if wanted == "torch":
        return torch_engine, "torch (train.feature_engine=torch)"
    cpu32 = runtime.device.type == "cpu" and str(runtime.precision) == "32"
    if not cpu32:
        why = ("ONNX Runtime here runs on the CPU" if runtime.device.type != "cpu" else
               f"ONNX Runtime's CPU path computes in fp32, the run in {runtime.precision}")
        if wanted == "onnxruntime":
            raise RuntimeError(f"train.feature_engine=onnxruntime: {why} (train.feature_engine=auto or torch)")
        return torch_engine, f"torch: {why}"
    if wanted == "auto" and n_images < PROBE_MIN:
        return torch_engine, f"torch: {n_images} images, too few to be worth a probe"
    x = sample[:PROBE]
    try:
        onnx_engine = OnnxFeatures(backbone, x.shape[1], x.shape[-1], runtime.threads)
        a, b = onnx_engine(x), torch_engine(x)
        diff, scale = float((a - b).abs().max()), float(b.abs().max())
        if not diff <= AGREE * max(scale, 1.0):
            raise ExportError(f"ONNX Runtime's features differ from torch's by {diff:.3g} (largest feature "
                              f"{scale:.3g}): the exported graph is not the backbone")
    except ExportError as e:
        if wanted == "onnxruntime":
            raise RuntimeError(f"train.feature_engine=onnxruntime: {e}") from None
        return torch_engine, f"torch: {e}"
    if wanted == "onnxruntime":
        return onnx_engine, "onnxruntime (train.feature_engine=onnxruntime)"
    ort_rate, torch_rate = _rate(onnx_engine, x), _rate(torch_engine, x)
    best = onnx_engine if ort_rate > torch_rate else torch_engine
    return best, (f"{best.name}: measured here on {len(x)} of the images, ONNX Runtime {ort_rate:.0f} images/s, "
                  f"torch {torch_rate:.0f} (fp32; they agree within {diff:.1g})")


def compute_features(backbone: nn.Module, loader: DeviceLoader, runtime: Runtime, engine=None,
                     progress: bool = False) -> torch.Tensor:
    """(N, F) float32 features of the loader's images in their stored order (eval mode, the run's precision);
    engine: a TorchFeatures / OnnxFeatures (None: torch)."""
    from tqdm.auto import tqdm

    engine = engine or TorchFeatures(backbone, runtime)
    backbone.eval()
    out = []
    with tqdm(total=loader.num_samples, unit="img", desc="features", leave=False, disable=not progress) as bar:
        for xb, _ in loader.iterate(None):
            out.append(engine(xb))
            bar.update(len(xb))
    return torch.cat(out)


def _load(path) -> torch.Tensor | None:
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # damaged: computed again
    return None


def feature_data(model: nn.Module, data: Prepared, runtime: Runtime, engine: str = "auto", log=print,
                 progress: bool = False) -> Prepared:
    """The same splits as features of `model.backbone`: loaders the head alone trains and is evaluated on.

    engine: train.feature_engine. Each split's features come from the cache when some engine computed them
    before (with "auto": either), else from the engine chosen once, on the first split that needs it.
    runtime.feature_engine / runtime.reasons["feature_engine"] record which computed them and why."""
    backbone = model.backbone.eval()
    splits = [p for p in (data.train, data.val, data.test) if p is not None]
    n_images = sum(p.num_samples for p in splits)
    looked_up = ("onnxruntime", "torch") if engine == "auto" else (engine,)
    chosen, cached_by = None, set()
    weights = _weights_hash(backbone)

    def features_of(loader: DeviceLoader) -> torch.Tensor:
        nonlocal chosen
        key = _key(weights, loader, runtime)
        for name in looked_up:
            feats = _load(cache_dir() / "features" / f"{key}-{name}.npy")
            if feats is not None:
                cached_by.add(name)
                return feats.to(loader.labels.device)
        if chosen is None:
            sample = next(iter(data.train.iterate(None)))[0]
            chosen = choose_engine(backbone, sample, n_images, runtime, engine)
        feats = compute_features(backbone, loader, runtime, chosen[0], progress)
        buf = io.BytesIO()
        np.save(buf, feats.cpu().numpy(), allow_pickle=False)
        path = cache_dir() / "features" / f"{key}-{chosen[0].name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return feats

    def convert(loader: DeviceLoader | None) -> DeviceLoader | None:
        if loader is None:
            return None
        fl = FeatureLoader(features_of(loader), loader.labels, loader.normalizer, loader.batch_size,
                           shuffle=loader.shuffle, generator=loader.generator)
        fl.aug_generator = getattr(loader, "aug_generator", None)  # saved in checkpoints, as the image loader's
        fl.sample_weights = loader.sample_weights
        return fl

    t0 = time.perf_counter()
    out = replace(data, train=convert(data.train), val=convert(data.val), test=convert(data.test))
    names = sorted(cached_by | ({chosen[0].name} if chosen else set()))
    runtime.feature_engine = " + ".join(names)
    why = [chosen[1]] if chosen else []
    if cached_by:
        why.append(f"{'some splits' if chosen else 'every split'} read from the cache (computed by "
                   f"{' and '.join(sorted(cached_by))})")
    runtime.reasons["feature_engine"] = "; ".join(why)
    log(f"features of the frozen backbone: {out.train.images.shape[1]} per image for {n_images:,} images in "
        f"{time.perf_counter() - t0:.1f} s — {runtime.reasons['feature_engine']}; the head trains on them")
    return out
