"""One run's parts, built from a Config: data, split, loaders, model, optimiser, schedule, stopper.

`build_experiment(cfg)` returns an `Experiment` (a typed dataclass) that `api.train` trains and
finishes, and that benchmarks use to time cnnlab's own loop. The order of the steps is part of the
result: seeding happens after the split and before the model is built, so the same config and seed
give the same weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import stats
from ._version import __version__
from .config import Config, ConfigError
from .data import DataError, Dataset, Split, load_data, prepare, stratified_split
from .data.augment import BatchAugment
from .data.loader import Normalizer, Prepared, add_policy, balance_sampling, balanced_class_weights, class_counts
from .data.policies import mix_batch
from .data.stream import default_memory_budget, fits_in_memory, parse_bytes, prepare_streaming
from .hardware import compile_cache
from .models import MODELS, create_model, freeze_backbone, load_weights, set_fusion
from .models.weights import check_imagenet_weights
from .training import EarlyStopper, LRSchedule, Runtime, build_optimizer
from .training.progress import ProgressLogger
from .training.runtime import seed_everything


@dataclass
class Experiment:
    """Everything one training run is made of (what `fit`, checkpoints and the run folder need)."""

    cfg: Config
    runtime: Runtime
    ds: Dataset
    split: Split
    streamed: bool                           # batches read from the memory-mapped cache (over the budget)
    data: Prepared                           # the train / val / test loaders and the normaliser
    model: nn.Module
    options: dict                            # the model options the config set (batch_norm, dropout, hidden)
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    stopper: EarlyStopper
    class_weights: torch.Tensor | None       # (K,) training-loss weights (data.class_weights=balanced)
    val_class_weights: torch.Tensor | None   # (K,) val_loss weights when training balances the classes
    trained: nn.Module | None = None         # what `fit` trains: the model, or its head alone on cached features
    mix: Callable | None = None              # MixUp / CutMix of training batches (data.mixup, data.cutmix)
    pruned: bool = False                     # a tune's pruner stopped this trial early

    def __post_init__(self):
        self.trained = self.trained or self.model

    def before_epoch(self, epoch: int) -> None:
        """Gradual unfreezing: the backbone stays frozen for model.unfreeze_after epochs, then trains too."""
        n = self.cfg.model.unfreeze_after
        if n is not None:
            freeze_backbone(self.model, frozen=epoch <= n)

    def fit_options(self) -> dict:
        """The loop's options this run sets (beyond model, data, optimiser, schedule, runtime)."""
        t = self.cfg.train
        return dict(stopper=self.stopper, l2=self.cfg.regularization.l2, clip_grad_norm=self.cfg.optim.clip_grad_norm,
                    class_weights=self.class_weights, val_class_weights=self.val_class_weights,
                    label_smoothing=t.label_smoothing, mix=self.mix, tta=t.tta == "flip",
                    before_epoch=self.before_epoch if self.cfg.model.unfreeze_after is not None else None)

    def split_json(self) -> dict:
        """split.json's content (offline copies included, with their originals)."""
        ds, split = self.ds, self.split
        labels = torch.cat([ds.labels, ds.labels[split.expanded_from]]) if split.expanded_from else ds.labels
        return split.to_json(ds.paths, labels, ds.classes)


def split_fractions(cfg: Config) -> tuple[float, float]:
    """(val, test) fractions; Keras-style validation_split means no test part."""
    if cfg.data.validation_split is not None:
        return cfg.data.validation_split, 0.0
    return cfg.data.val_fraction, cfg.data.test_fraction


def _augment_kwargs(cfg: Config) -> dict:
    d = cfg.data
    return {"rotation": d.aug_rotation, "hflip": d.aug_hflip, "scale": d.aug_scale, "translate": d.aug_translate}


def build_model(cfg: Config, ds: Dataset, log=print) -> tuple[nn.Module, dict]:
    """The configured model for this data (+ weights, + frozen backbone); returns (model, options)."""
    m = cfg.model
    options = {k: v for k, v in dict(batch_norm=m.batch_norm, dropout=m.dropout, hidden=m.hidden).items()
               if v is not None}
    c, size = ds.images.shape[1], ds.images.shape[-1]
    model = create_model(m.name, len(ds.classes), c, size, init=m.init, **options)
    if m.weights:
        report = load_weights(model, m.weights)
        log(f"weights: loaded {len(report['loaded'])} tensors from {m.weights}; "
            f"skipped {len(report['skipped'])}" + (f" ({', '.join(report['skipped'][:4])}…)"
                                                   if report["skipped"] else ""))
    if m.freeze == "backbone":
        n = freeze_backbone(model)
        log(f"backbone frozen: {n:,} trainable parameters left (the head)")
    return model, options


def _split(cfg: Config, ds: Dataset) -> Split:
    val_f, test_f = split_fractions(cfg)
    split = stratified_split(ds.labels, val_f, test_f, cfg.data.split_seed, ds.predefined)
    if not split.train:
        raise DataError("the training split is empty; lower data.val_fraction / data.test_fraction")
    if not split.val and not split.test:
        raise DataError(f"no validation or test images: {len(ds)} images in {len(ds.classes)} classes with "
                        f"val_fraction={val_f:g}, test_fraction={test_f:g} leave none held out; raise a fraction "
                        "(or data.max_per_class)")
    return split


def pretrained_normalizer(cfg: Config, channels: int) -> Normalizer | None:
    """The statistics the pretrained weights expect (data.norm_stats: auto with model.weights=imagenet, or
    imagenet), averaged over RGB for grayscale input; None: fit them to the training split."""
    d, info = cfg.data, MODELS.info[cfg.model.name]
    wanted = d.norm_stats == "imagenet" or (d.norm_stats == "auto" and cfg.model.weights == "imagenet")
    if not d.normalize or not wanted:
        return None
    from .models.registry import IMAGENET_MEAN, IMAGENET_STD

    mean, std = info.get("mean", IMAGENET_MEAN), info.get("std", IMAGENET_STD)
    if channels == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return Normalizer(list(mean), list(std))


def _loaders(cfg: Config, ds: Dataset, split: Split, runtime: Runtime, log: ProgressLogger) -> tuple[Prepared, bool]:
    """The loaders, in memory or streamed from the cache when the resident splits exceed data.memory_budget."""
    d = cfg.data
    budget = parse_bytes(d.memory_budget) if d.memory_budget is not None else default_memory_budget(runtime.device)
    c, h, w = ds.images.shape[1:]
    resident = len(split.train) * (1 + d.expand) + len(split.val) + len(split.test)
    streamed = not fits_in_memory(resident, c, h, w, budget)
    if streamed:
        log.message(f"{resident:,} images of {c}×{h}×{w} exceed data.memory_budget ({budget / 2**20:,.0f} MiB): "
                    "streaming batches from the memory-mapped cache")
    # data.withhold_test: the loaders never see the test indices (split.json still lists them)
    seen = dataclasses.replace(split, test=[]) if d.withhold_test else split
    prepared = (prepare_streaming if streamed else prepare)(
        ds, seen, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, device=runtime.device,
        seed=cfg.train.seed, normalize=d.normalize, augment=_augment_kwargs(cfg) if d.augment else None,
        expand=d.expand, expand_seed=d.split_seed + 1, expand_augment=_augment_kwargs(cfg),
        channels_last=runtime.channels_last, normalizer=pretrained_normalizer(cfg, ds.images.shape[1]))
    split.expanded_from = seen.expanded_from
    add_policy(prepared.train, d.randaugment, d.randaugment_magnitude)
    return prepared, streamed


def _balance(cfg: Config, ds: Dataset, data: Prepared, runtime: Runtime,
             log: ProgressLogger) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """data.class_weights / data.sampler = balanced, and a hint when the classes are imbalanced without them.
    Returns (training-loss class weights, val_loss class weights)."""
    d, k, train = cfg.data, len(ds.classes), data.train
    weights = balanced_class_weights(train.labels, k).to(runtime.device) if d.class_weights == "balanced" else None
    if d.sampler == "balanced":
        balance_sampling(train, k)
    val_weights = None  # val_loss weights each class equally when training balances them
    if data.val is not None and (d.class_weights == "balanced" or d.sampler == "balanced"):
        val_weights = balanced_class_weights(data.val.labels, k)
    if d.class_weights == "balanced" and d.sampler == "balanced":
        log.message("note: data.class_weights=balanced and data.sampler=balanced together correct the imbalance "
                    "twice (rare classes end up over-weighted); one of them is usually enough")
        return weights, val_weights
    ratio, big, small = stats.imbalance(class_counts(train.labels, k).tolist()) or (1.0, 0, 0)
    if ratio >= stats.IMBALANCED and d.class_weights == "none" and d.sampler == "shuffle":
        log.message(f"classes are imbalanced: {ds.classes[big]} has {ratio:.1f}× the training images of "
                    f"{ds.classes[small]}; consider data.class_weights=balanced or data.sampler=balanced")
    return weights, val_weights


def build_experiment(cfg: Config, log: ProgressLogger | None = None, dist=None) -> Experiment:
    """Data, split, loaders, model, optimiser, schedule and stopper for `cfg`, seeded.

    dist: one process of several (training.distributed.Dist): the training loader deals each global batch
    out by rank, and the schedule counts those global batches."""
    log = log or ProgressLogger("none")
    t = cfg.train
    if cfg.model.weights == "imagenet":
        check_imagenet_weights(cfg.model.name)  # a missing weights package: said before any work
    runtime = Runtime(t.device, t.precision, t.threads, t.channels_last, t.fused, t.reuse_memory, t.native)
    ds = load_data(cfg.data, progress=log.mode == "bar")
    split = _split(cfg, ds)
    seed_everything(t.seed)  # after the split (its own seed), before anything draws: augmentation, init, dropout
    data, streamed = _loaders(cfg, ds, split, runtime, log)
    class_weights, val_class_weights = _balance(cfg, ds, data, runtime, log)
    model, options = build_model(cfg, ds, log=log.message)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fuse = runtime.fused and not t.compile  # compile fuses by itself
    set_fusion(model, fuse, runtime.native_for(model, fuse))
    if t.compile:
        folder, why = compile_cache()  # torch's own cache mixes instruction sets up (hardware.compile_cache)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        runtime.reasons["compile_cache"] = f"{folder}: {why}"
        model.compile()  # in place: state_dict keys (checkpoints, saved models) stay the eager module's
    trained = model
    if _use_feature_cache(cfg, log):
        from .features import feature_data

        data = feature_data(model, data, runtime, t.feature_engine, log=log.message, progress=log.mode == "bar")
        trained = model.head
    warp = getattr(data.train, "augment", None)  # (the head-only mode's feature loaders have none)
    if isinstance(warp, BatchAugment):  # decided after the checks above, which may refuse the config
        warp.native = runtime.native_warp(warp.warps)
    if dist is not None:
        from .training.distributed import ShardedLoader

        data.train = ShardedLoader(data.train, dist)
    o, s = cfg.optim, cfg.schedule
    optimizer = build_optimizer(_param_groups(cfg, trained), o.name, o.lr, momentum=o.momentum,
                                nesterov=o.nesterov, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                                weight_decay=o.weight_decay, fused=runtime.fused)
    schedule = LRSchedule(optimizer, s.name, o.lr, len(data.train), t.epochs, warmup_epochs=s.warmup_epochs,
                          step_size=s.step_size, gamma=s.gamma, min_lr=s.min_lr, cycle_epochs=s.cycle_epochs,
                          pct_start=s.pct_start, patience=s.patience)
    es = t.early_stopping
    stopper = EarlyStopper(es.monitor, es.patience, es.min_delta) if es else EarlyStopper(t.monitor)
    d = cfg.data
    g = data.train.aug_generator
    mix = (lambda x, y: mix_batch(x, y, g, d.mixup, d.cutmix)) if d.mixup > 0 or d.cutmix > 0 else None
    return Experiment(cfg, runtime, ds, split, streamed, data, model, options, optimizer, schedule, stopper,
                      class_weights, val_class_weights, trained, mix)


def _use_feature_cache(cfg: Config, log: ProgressLogger) -> bool:
    from .features import eligible

    ok, why_not = eligible(cfg)
    wanted = cfg.model.cache_features
    if wanted and not ok:
        raise ConfigError(f"model.cache_features=true needs a frozen backbone and nothing random before the head; "
                          f"here: {why_not}")
    return ok if wanted is None else bool(wanted)


def _param_groups(cfg: Config, model: nn.Module):
    """The parameters, or two groups (backbone at optim.backbone_lr_scale × the rate, head) for discriminative
    rates and gradual unfreezing (which keeps the frozen backbone in the optimiser, to train it later)."""
    scale, unfreeze = cfg.optim.backbone_lr_scale, cfg.model.unfreeze_after is not None
    if (scale == 1.0 and not unfreeze) or not hasattr(model, "backbone"):  # (the head alone, on features)
        return model.parameters()
    backbone = {id(p) for p in model.backbone.parameters()}
    return [{"params": list(model.backbone.parameters()), "lr_scale": scale},
            {"params": [p for p in model.parameters() if id(p) not in backbone], "lr_scale": 1.0}]


# --------------------------------------------------------------------------- env.json

def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(runtime: Runtime, seed: int) -> dict:
    """What env.json records of the software and machine a run used."""
    from importlib.metadata import version

    import numpy

    return {"cnnlab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": version("torchvision"),  # not `import torchvision`: ~1 s a run for one string
            "numpy": numpy.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seed": seed, **runtime.describe(), "git_revision": _git_revision(),
            "command": " ".join(sys.argv)}
