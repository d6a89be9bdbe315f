"""Typed experiment configuration: YAML (safe loading only) + dotted overrides.

A config is a tree of dataclasses. Every key has a default, a type and, where
it matters, a range or a list of choices; `load_config` rejects unknown keys,
wrong types and out-of-range values *before* any work starts, naming the key
and the valid choices.

    cfg = load_config("recipes/demo.yaml", ["optim.lr=0.01", "train.epochs=3"])

Longer than the project's ~400-line guide on purpose: the schema is one file, so every key, its default,
its meaning and its checks read top to bottom in one place (what `cnnlab config --keys` prints). Reading
text (YAML files, overrides) lives in configio.py; the choices of extensible keys in the registries.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .configio import (MAX_NODES, ConfigError, check_expanded_size, deepcopy_tree, find_recipe,  # noqa: F401
                       parse_value, read_yaml, split_override)


SEED_MAX = 2**32 - 1  # seeds are 32-bit (NumPy's limit); larger ones overflowed torch's 64-bit arithmetic


def _opt(default, help: str, **checks):
    """A config field: its default, a one-line meaning (with unit) and checks.

    checks: choices=[...], min=, max= (inclusive), gt= (exclusive), lt=; registry="optimizer" (…): the
    choices are that registry's entries (see `registry`), read when a config is checked; true_means="x": a
    text key that also takes true (→ "x") and false (→ null).
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: typing.cast(Any, type(d))(d),
                     metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


def registry(kind: str):
    """The Registry behind a config choice. Imported late: those modules never import the config."""
    if kind == "model":
        from .models import MODELS as reg
    elif kind == "init":
        from .models.init import INITS as reg
    elif kind == "source":
        from .data.sources import SOURCES as reg
    elif kind == "optimizer":
        from .training.optim import OPTIMIZERS as reg
    elif kind == "schedule":
        from .training.optim import SCHEDULES as reg
    else:
        raise KeyError(kind)
    return reg


MONITORS = ["val_loss", "val_accuracy", "loss", "accuracy"]


@dataclass
class EarlyStopping:
    patience: int = _opt(5, "epochs without improvement before stopping", min=1)
    monitor: str = _opt("val_loss", "metric watched", choices=MONITORS)
    min_delta: float = _opt(0.0, "smallest change that counts as improvement", min=0.0)


@dataclass
class DataConfig:
    source: str = _opt("animal-shapes", "where the images come from (`cnnlab datasets`)", registry="source")
    image_size: Optional[int] = _opt(None, "side of the square input in pixels (null: the source's own)", min=1, max=4096)
    channels: Optional[int] = _opt(None, "1 (grayscale) or 3 (RGB); null: the source's own", choices=[1, 3])
    batch_size: int = _opt(128, "training batch size (images)", min=1)
    eval_batch_size: int = _opt(1024, "batch size for validation / test / predict", min=1)
    val_fraction: float = _opt(0.15, "fraction of each class held out for validation", min=0.0, lt=1.0)
    test_fraction: float = _opt(0.15, "fraction of each class held out for the test", min=0.0, lt=1.0)
    validation_split: Optional[float] = _opt(
        None, "Keras-style: validation fraction with no test split (stratified and shuffled, "
              "unlike Keras' last-N-percent); overrides val/test_fraction", gt=0.0, lt=1.0)
    withhold_test: bool = _opt(False, "cut the test split as usual (split.json lists it) but never load or "
                               "evaluate it: metrics come from validation (`cnnlab tune`'s trials: selection "
                               "never sees the test)")
    split_seed: int = _opt(0, "seed of the stratified split (kept fixed across training seeds)", min=0,
                           max=SEED_MAX)
    classes: Optional[list[str]] = _opt(None, "keep only these classes (by name), in this order (null: all)")
    max_per_class: Optional[int] = _opt(None, "keep at most this many images per class (seeded)", min=1)
    normalize: bool = _opt(True, "zero mean / unit variance per channel (statistics: data.norm_stats)")
    norm_stats: str = _opt("auto", "normalisation statistics: auto (the pretrained weights' own with "
                           "model.weights=imagenet, else the training split's) | train | imagenet",
                           choices=["auto", "train", "imagenet"])
    resize: str = _opt("stretch", "how folder images reach image_size", choices=["stretch", "center-crop"])
    # the first paper's synthetic set
    random_samples: int = _opt(100, "source 'random': number of images", min=2)
    random_classes: int = _opt(2, "source 'random': number of classes", min=2)
    # augmentation, applied to whole batches on the device while training
    augment: bool = _opt(False, "random rotation / flip / scale / translation of training batches")
    aug_rotation: float = _opt(10.0, "max rotation, degrees (uniform in ±)", min=0.0, max=180.0)
    aug_hflip: float = _opt(0.5, "probability of a horizontal flip", min=0.0, max=1.0)
    aug_scale: float = _opt(0.1, "max relative zoom (uniform in 1±)", min=0.0, lt=1.0)
    aug_translate: float = _opt(0.1, "max shift as a fraction of the image side", min=0.0, max=0.5)
    expand: int = _opt(0, "offline expansion: K augmented copies of each training image (second paper: 2)", min=0, max=100)
    randaugment: int = _opt(0, "RandAugment-style: this many random colour / geometry ops per training image, "
                            "on whole batches (0: off)", min=0, max=6)
    randaugment_magnitude: float = _opt(9.0, "their strength, 0–10 (RandAugment's M)", min=0.0, max=10.0)
    mixup: float = _opt(0.0, "MixUp: Beta(α, α) of each training batch mixed with a shuffled copy (0: off; "
                             "typical 0.2–0.4)", min=0.0)
    cutmix: float = _opt(0.0, "CutMix: a Beta(α, α)-sized box pasted from a shuffled copy (0: off; typical 1.0); "
                              "with mixup too, each batch uses one of them at random", min=0.0)
    memory_budget: Optional[str] = _opt(
        None, "bytes the decoded splits may hold in memory (4GB, 800MB, 40%); null: half the available RAM; "
              "larger data is streamed from the memory-mapped cache")
    on_bad_file: str = _opt("skip", "unreadable images in a folder: skip (listed) or fail", choices=["skip", "fail"])
    class_weights: str = _opt("none", "imbalanced classes: 'balanced' weights each class's training loss by "
                              "n_train / (classes × its count), as scikit-learn's 'balanced'", choices=["none", "balanced"])
    sampler: str = _opt("shuffle", "training order: shuffle (each image once per epoch) or balanced (each epoch "
                        "draws as many images, with replacement, every class equally likely)",
                        choices=["shuffle", "balanced"])


@dataclass
class ModelConfig:
    name: str = _opt("harahap-cnn", "a registered model; see `cnnlab models`", registry="model")
    weights: Optional[str] = _opt(None, "null | PATH (.safetensors, or .pt/.pth state dict) | imagenet "
                                  "(see `cnnlab models`: EfficientNet-Lite offline, torchvision's families "
                                  "through its weights API)")
    freeze: str = _opt("none", "'backbone' trains only the classifier head (its batch norm frozen too)",
                       choices=["none", "backbone"])
    unfreeze_after: Optional[int] = _opt(None, "with freeze=backbone: train the head alone for this many epochs, "
                                         "then everything (gradual unfreezing, fastai's fine_tune); null: never",
                                         min=1)
    cache_features: Optional[bool] = _opt(None, "head-only training on the frozen backbone's features computed "
                                          "once per split (a linear probe in seconds); null: when nothing random "
                                          "happens before the head (no augmentation, no unfreezing)")
    batch_norm: Optional[bool] = _opt(None, "batch normalisation on/off (null: the model's default)")
    dropout: Optional[float] = _opt(None, "dropout probability before the classifier (null: default)", min=0.0, lt=1.0)
    hidden: Optional[list[int]] = _opt(None, "hidden layer widths of the dense head / MLP (null: default)")
    init: str = _opt("default", "weight initialisation", registry="init")


@dataclass
class OptimConfig:
    name: str = _opt("adam", "optimiser", registry="optimizer")
    lr: float = _opt(0.001, "base (peak) learning rate", gt=0.0, max=10.0)
    momentum: float = _opt(0.9, "sgd / rmsprop momentum", min=0.0, lt=1.0)
    nesterov: bool = _opt(False, "sgd: Nesterov momentum")
    beta1: float = _opt(0.9, "adam / adamw first-moment decay", min=0.0, lt=1.0)
    beta2: float = _opt(0.999, "adam / adamw second-moment decay", min=0.0, lt=1.0)
    eps: float = _opt(1e-7, "adam / rmsprop epsilon (Keras' default)", gt=0.0)
    weight_decay: float = _opt(0.0, "decoupled weight decay (adamw) or the optimiser's own decay term; "
                                     "NOT the papers' L2 loss term, see regularization.l2", min=0.0)
    clip_grad_norm: Optional[float] = _opt(None, "clip the global gradient norm to this value", gt=0.0)
    backbone_lr_scale: float = _opt(1.0, "discriminative learning rates: the backbone's rate is the base rate × this "
                                         "(e.g. 0.1 when fine-tuning pretrained weights); the head's is the base",
                                 gt=0.0, max=1.0)


@dataclass
class ScheduleConfig:
    name: str = _opt("constant", "learning-rate schedule", registry="schedule")
    warmup_epochs: float = _opt(0.0, "linear warm-up from 0 over this many epochs", min=0.0)
    step_size: float = _opt(10.0, "step: epochs between decays", gt=0.0)
    gamma: float = _opt(0.1, "step / exponential / plateau decay factor (exponential: per epoch)", gt=0.0, max=1.0)
    min_lr: float = _opt(0.0, "cosine / cyclic lower learning rate", min=0.0)
    cycle_epochs: float = _opt(4.0, "cyclic: epochs per full triangle", gt=0.0)
    pct_start: float = _opt(0.3, "one-cycle: fraction of training spent warming up", gt=0.0, lt=1.0)
    patience: int = _opt(3, "plateau: epochs without improvement before decaying", min=1)


@dataclass
class RegularizationConfig:
    l2: float = _opt(0.0, "λ of the papers' loss term λ/2·Σ‖W‖² over conv/dense weights", min=0.0)


@dataclass
class TrainConfig:
    epochs: int = _opt(10, "maximum number of epochs", min=1)
    seed: int = _opt(0, "seed of weights, data order, augmentation and dropout", min=0, max=SEED_MAX)
    early_stopping: Optional[EarlyStopping] = _opt(None, "null, or {patience, monitor, min_delta}")
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss (0: off; typical 0.1)", min=0.0, lt=1.0)
    tta: str = _opt("none", "test-time augmentation at evaluation: flip (average of the image and its mirror)",
                    choices=["none", "flip"])
    monitor: str = _opt("val_loss", "metric that picks the best epoch when early stopping is off",
                        choices=MONITORS)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    precision: str = _opt("auto", "auto (bf16-mixed where the CPU or GPU computes bf16 natively: AVX-512 BF16, AMX; "
                                "fp32 elsewhere) | 32 | bf16-mixed | 16-mixed (16-mixed on CUDA only)",
                          choices=["auto", "32", "bf16-mixed", "16-mixed"])
    channels_last: Optional[bool] = _opt(
        None, "channels-last memory format (null: on for the CPU, where it measured 0–81 % faster, never slower; off on CUDA)")
    compile: bool = _opt(False, "torch.compile the model (measured 0.40–0.55× the speed of eager on the papers' "
                                "nets and 0.95–1.01× on resnet18 on the CPU, after a long first compile; needs a C++ "
                                "compiler)")
    fused: Optional[bool] = _opt(
        None, "fused kernels: the optimiser's fused step (sgd, adam, adamw) and the papers' nets' fused "
              "ReLU → batch norm → max-pool in training, the pretrained families' batch norms folded into "
              "their convolutions at inference (null: on for the CPU, where they measured faster; off on CUDA)")
    native: Optional[bool] = _opt(
        None, "cnnlab's native CPU kernels for the papers' conv blocks (ReLU → batch norm → max-pool, ReLU → "
              "max-pool; channels-last fp32 or bf16; the first convolutions' passes on the image; a few-channel "
              "last convolution + ReLU in bf16 with AVX-512 BF16 and no AMX, in fp32 on AVX2 CPUs without AVX-512; "
              "with AVX-512 BF16 and no AMX a 1-channel first convolution with its block's forward too), and data.augment's flip and affine warp of the training batches "
              "in one pass (any model), compiled once per machine with its C compiler (null: on "
              "for the CPU where a C compiler is found, else the torch-op path; true: an error without one, or on CUDA)")
    feature_engine: str = _opt(
        "auto", "what computes a frozen backbone's features once in the head-only mode: auto (on the CPU in fp32, "
                "ONNX Runtime or torch, whichever a probe on the run's images measures faster — ONNX Runtime "
                "1.96× torch on EfficientNet-Lite0 on an AVX2 CPU; torch at bf16-mixed and on CUDA) | torch | "
                "onnxruntime (the backbone exported once, cached; needs cnnlab[onnx])",
        choices=["auto", "torch", "onnxruntime"])
    reuse_memory: Optional[bool] = _opt(
        None, "keep freed tensor memory in the process instead of re-faulting it from the OS every step "
              "(glibc; null: on for the CPU, where it measured faster; process-wide once on)")
    threads: Optional[int] = _opt(None, "CPU threads (null: one per logical CPU this process may use)", min=1)
    dist_timeout: float = _opt(120.0, "with several processes (--nproc, torchrun): seconds a collective waits "
                               "for a peer before the run stops with an error (a dead or hung process)", gt=0.0)
    checkpoint_every_steps: Optional[int] = _opt(
        None, "also checkpoint every N optimiser steps (null: after every epoch only)", min=1)
    progress: str = _opt("auto", "progress bar: auto (only on a terminal) | bar | plain | none",
                         choices=["auto", "bar", "plain", "none"])


@dataclass
class TrackConfig:
    """Optional outputs fed from the finished run folder (cnnlab.tracking); they never change a result."""

    mlflow: Optional[str] = _opt(
        None, "MLflow tracking: null (off) | default (or true: a SQLite store mlflow.db next to the run, study or "
              "tune folder, e.g. runs/mlflow.db) | a tracking URI: sqlite:///PATH.db, http(s)://HOST:PORT, "
              "postgresql://…, databricks (plain file paths and file: stores are refused)", true_means="default")
    experiment: Optional[str] = _opt(None, "MLflow experiment name (null: the run's config name, or the study's / "
                                     "tune's name)")
    tensorboard: bool = _opt(False, "TensorBoard event files in RUN/tensorboard/ (scalars per epoch, hparams, "
                                    "confusion matrix)")


@dataclass
class Config:
    name: Optional[str] = _opt(None, "run name (null: recipe name + time)")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data source, split, preprocessing"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "network"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "learning-rate schedule"})
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig, metadata={"help": "loss terms"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "loop, seed, runtime"})
    track: TrackConfig = field(default_factory=TrackConfig, metadata={"help": "MLflow / TensorBoard outputs"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Cross-field checks that a single key's range cannot express; folder paths made absolute
        (relative to the current directory) so the saved config works from anywhere."""
        if self.name is not None:
            check_run_name(self.name)
        d = self.data
        from .data.sources import normalize_source  # late: data does not import the config

        d.source = normalize_source(d.source)  # folder:PATH made absolute, so the saved config works anywhere
        if d.validation_split is None and d.val_fraction + d.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {d.val_fraction + d.test_fraction:g}: "
                "they must sum to less than 1 so that something is left to train on")
        if d.memory_budget is not None:
            from .data.stream import parse_bytes

            try:
                parse_bytes(d.memory_budget)
            except ValueError as e:
                raise ConfigError(f"data.memory_budget: {e}") from None
        if self.data.classes is not None and (len(self.data.classes) < 2 or
                                              len(set(self.data.classes)) != len(self.data.classes)):
            raise ConfigError("data.classes: at least two distinct class names, e.g. [cat, dog]")
        if self.model.weights == "imagenet":
            self._resolve_pretrained()
        if self.model.unfreeze_after is not None and self.model.freeze != "backbone":
            raise ConfigError("model.unfreeze_after needs model.freeze=backbone (the head trains alone first)")
        if self.model.hidden is not None and (not self.model.hidden or min(self.model.hidden) < 1):
            raise ConfigError("model.hidden: a non-empty list of positive layer widths, e.g. [128]")
        dev = self.train.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"unknown train.device {dev!r}; choose one of: auto, cpu, cuda, cuda:N")
        if self.track.mlflow is not None:
            from .tracking.settings import check_mlflow_uri  # late; settings alone: the rest reads run folders

            self.track.mlflow = check_mlflow_uri(self.track.mlflow)  # sqlite:///relative made absolute
        if self.track.experiment is not None and not self.track.experiment.strip():
            raise ConfigError("track.experiment: an MLflow experiment name, or null for the config's name")


    def _resolve_pretrained(self) -> None:
        """model.weights=imagenet: the backbone's input size and RGB unless the config sets them."""
        info = registry("model").info[self.model.name]
        if "imagenet" not in info:
            have = [n for n, i in registry("model").info.items() if "imagenet" in i]
            raise ConfigError(f"model.weights=imagenet: {self.model.name} has no ImageNet weights; models that have "
                              f"them: {', '.join(sorted(have))} (`cnnlab models` says which load offline here)")
        d = self.data
        if d.image_size is None:
            d.image_size = info["input_size"]
        if d.channels is None:
            d.channels = 3  # grayscale images are repeated into RGB, as the weights expect
        least = info.get("min_imagenet_size", 32)
        if d.image_size < least:
            raise ConfigError(f"data.image_size={d.image_size} is too small for {self.model.name} with ImageNet "
                              f"weights (at least {least}; they were trained at {info['input_size']})")


def check_run_name(name: str) -> None:
    """A run name becomes one folder under the runs root: no path separators, '.', '..' or control characters."""
    if (not name.strip() or name in (".", "..") or any(c in name for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ConfigError(f"name {name!r}: a run name becomes one folder under the runs root, so it may not be "
                          "empty, '.' or '..', or hold '/', '\\' or control characters; to write elsewhere use --out")


# --------------------------------------------------------------------------- building a Config

def _choices_msg(key: str, value: Any, choices, kind: str | None = None) -> str:
    kind = kind or key.split(".")[-1]
    msg = f"unknown {kind} {value!r} ({key}); choose one of: {', '.join(map(str, choices))}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp, meta: dict) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner, meta)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, bool) and tp is EarlyStopping:
            return EarlyStopping() if value else None
        if isinstance(value, int) and not isinstance(value, bool) and tp is EarlyStopping:
            value = {"patience": value}  # `train.early_stopping=5` is shorthand for the patience
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}; "
                              f"got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}; got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner, {}) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false (or on/off); got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{key}: expected an integer; got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number; got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number; got {value!r}")
    elif tp is str:
        if isinstance(value, bool) and "true_means" in meta:  # track.mlflow: true → default, false → off
            return meta["true_means"] if value else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # name=2024, data.classes=[3, 5]: digit-only names
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string; got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(_choices_msg(key, value, choices, meta.get("kind")))
    if "registry" in meta:
        reg = registry(meta["registry"])
        if not reg.accepts(value):
            raise ConfigError(_choices_msg(key, value, reg.spellings(), reg.kind))
    for check, ok, word in (("min", lambda v, b: v >= b, "at least"), ("max", lambda v, b: v <= b, "at most"),
                            ("gt", lambda v, b: v > b, "greater than"), ("lt", lambda v, b: v < b, "less than")):
        if check in meta and not ok(value, meta[check]):
            raise ConfigError(f"{key}: must be {word} {meta[check]}; got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(_unknown_key_msg(prefix, k, list(fields)))
        kwargs[k] = _coerce(prefix + k, v, hints[k], dict(fields[k].metadata))
    return cls(**kwargs)


def _unknown_key_msg(prefix: str, key: Any, valid: list[str]) -> str:
    msg = f"unknown key {prefix}{key!s}; valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(valid)}"
    close = difflib.get_close_matches(str(key), valid, n=1)
    return msg + (f" (did you mean {prefix}{close[0]}?)" if close else "")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if isinstance(nxt, bool) and nxt:
            nxt = {}  # early_stopping: true → its defaults, then the nested key
        elif isinstance(nxt, int) and not isinstance(nxt, bool):
            nxt = {"patience": nxt}  # early_stopping: 5 shorthand
        elif nxt is not None and not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is {nxt!r}, not a section; cannot set {key}")
        if nxt is None:
            nxt = {}
        node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def config_from_dict(tree: dict, overrides: list[str] | dict | None = None) -> Config:
    """Validate a nested dict (+ overrides as 'a.b=v' strings or {a.b: v}) into a Config."""
    check_expanded_size(tree, "the config")
    tree = deepcopy_tree(tree)
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides or []]
    for k, v in items:
        check_expanded_size(v, f"override {k}")
        _set_dotted(tree, k, v)
    cfg = _build(Config, tree)
    cfg.check()
    return cfg


def load_config(source: str | Path | dict | Config | None = None,
                overrides: list[str] | dict | None = None) -> Config:
    """A validated Config from a YAML path, a dict, an existing Config or None (defaults)."""
    if isinstance(source, Config):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = source
    elif source is None:
        tree = {}
    else:
        tree = read_yaml(source)
        if tree.get("name") is None:
            tree["name"] = Path(source).stem
    return config_from_dict(tree, overrides)


# keys that change how a run computes or looks, never what it computes: a resumed run or a study's rerun
# may differ in them
RESULT_NEUTRAL = {"train.progress", "train.threads", "train.reuse_memory", "train.dist_timeout",
                  "track.mlflow", "track.experiment", "track.tensorboard"}
RESUME_IGNORED = RESULT_NEUTRAL | {"name"}  # may differ between sessions of one run


def dotted(tree: dict, prefix: str = "") -> dict:
    """A config tree as {dotted key: value} (early_stopping stays one value)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "early_stopping":
            out.update(dotted(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_differences(old: Config, new: Config, ignore: set[str] = frozenset()) -> list[tuple[str, str]]:
    """[(dotted key, 'key: old → new')] for every key whose value differs."""
    a, b = dotted(old.to_dict()), dotted(new.to_dict())
    return [(k, f"{k}: {a.get(k)!r} → {b.get(k)!r}") for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_keys(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every key, for `--help` and the README."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and f.name != "early_stopping":
            rows += describe_keys(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "")
        choices = registry(f.metadata["registry"]).spellings() if "registry" in f.metadata else f.metadata.get("choices")
        if choices is not None and len(choices) > 2:
            help_ += f" [{', '.join(map(str, choices))}]"
        rows.append((prefix + f.name, "null" if default is None else str(default), help_))
    return rows
