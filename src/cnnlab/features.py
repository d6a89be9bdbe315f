"""Head-only training on a frozen backbone's features, computed once per split (a linear probe in seconds).

With `model.freeze=backbone` and nothing random before the head (no augmentation of any kind, no gradual
unfreezing, no flip TTA), every epoch would push the same images through the same frozen backbone. Here
they go through it once: each split's features (N, F) are computed in eval mode and kept on the device,
and the head trains on them like any model on any data — same loop, same checkpoints. The features are
also cached on disk (under $CNNLAB_CACHE/features), keyed by the images, the backbone's weights, the
normalisation and the precision, so the other seeds of a study skip the backbone altogether.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .data.dataset import cache_dir
from .data.loader import DeviceLoader, Prepared
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


def _key(backbone: nn.Module, loader: DeviceLoader, runtime: Runtime) -> str:
    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    h.update(loader.images.detach().cpu().contiguous().numpy().data)
    if getattr(loader, "indices", None) is not None:  # a streamed split: which rows of the cache
        h.update(loader.indices.numpy().data)
    h.update(repr((loader.normalizer.mean, loader.normalizer.std, str(runtime.precision), runtime.channels_last,
                   tuple(loader.images.shape))).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_features(backbone: nn.Module, loader: DeviceLoader, runtime: Runtime) -> torch.Tensor:
    """(N, F) float32 features of the loader's images in their stored order (eval mode, the run's precision)."""
    backbone.eval()
    out = []
    for xb, _ in loader.iterate(None):
        for x in xb.split(inference_chunk(backbone, xb, runtime)):  # passes under glibc's mmap limit
            with runtime.autocast():
                out.append(backbone(x).float())
    return torch.cat(out)


def cached_features(backbone: nn.Module, loader: DeviceLoader, runtime: Runtime, log=print) -> torch.Tensor:
    path = cache_dir() / "features" / f"{_key(backbone, loader, runtime)}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)).to(loader.labels.device)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # damaged: computed again
    feats = compute_features(backbone, loader, runtime)
    buf = io.BytesIO()
    np.save(buf, feats.cpu().numpy(), allow_pickle=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return feats


def feature_data(model: nn.Module, data: Prepared, runtime: Runtime, log=print) -> Prepared:
    """The same splits as features of `model.backbone`: loaders the head alone trains and is evaluated on."""
    def convert(loader: DeviceLoader | None) -> DeviceLoader | None:
        if loader is None:
            return None
        feats = cached_features(model.backbone, loader, runtime, log)
        fl = FeatureLoader(feats, loader.labels, loader.normalizer, loader.batch_size, shuffle=loader.shuffle,
                           generator=loader.generator)
        fl.aug_generator = getattr(loader, "aug_generator", None)  # saved in checkpoints, as the image loader's
        fl.sample_weights = loader.sample_weights
        return fl

    import time

    t0 = time.perf_counter()
    out = replace(data, train=convert(data.train), val=convert(data.val), test=convert(data.test))
    log(f"features of the frozen backbone: {out.train.images.shape[1]} per image, computed once for "
        f"{sum(len(p.labels) for p in (data.train, data.val, data.test) if p is not None):,} images "
        f"in {time.perf_counter() - t0:.1f} s; the head trains on them")
    return out
