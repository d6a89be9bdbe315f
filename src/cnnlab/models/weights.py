"""Loading pre-trained weights (no pickle code ever runs) and freezing the backbone.

Accepted: a .safetensors file (a cnnlab run's model.safetensors included), a
PyTorch state dict (.pt/.pth/.ckpt/.bin) read with `torch.load(weights_only=True)`
only, or `imagenet` (torchvision's own published weights through its API; needs
the internet once, then torchvision's cache). Tensors are matched by name and
shape; a 3-channel first conv is summed to 1 channel (or tiled to 3) when the
input differs; the classifier head of another task is skipped.
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


def _torchvision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    import torchvision

    arch = getattr(model, "torchvision_arch", None)
    if arch is None:
        raise WeightsError("model.weights=imagenet: this model has no torchvision ImageNet weights; "
                           "use vgg16, vgg19 or resnet18, or give a file")
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # offline: URLError / socket errors
        raise WeightsError(f"could not fetch torchvision's {weights} ({type(e).__name__}: {e}); "
                           "without internet, download it elsewhere and pass model.weights=PATH") from None


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
    """Copy matching tensors from `source` into `model`; returns {'loaded': [...], 'skipped': [...]}."""
    if source == "imagenet":
        state = _torchvision_state_dict(model)
    else:
        state = read_state_dict(os.path.expanduser(source))
    own = model.state_dict()
    prefix = getattr(model, "torchvision_prefix", None)
    if prefix and not any(k in own for k in state):  # torchvision key names → ours
        old, new = prefix
        state = {new + k[len(old):]: v for k, v in state.items() if k.startswith(old)}
    loaded, skipped = [], []
    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    for key, tensor in state.items():
        if key not in own:
            skipped.append(f"{key} (no such layer)")
            continue
        if tensor.shape != own[key].shape:
            adapted = _adapt_first_conv(tensor, own[key]) if key == first_conv else None
            if adapted is None:
                skipped.append(f"{key} (shape {tuple(tensor.shape)} ≠ {tuple(own[key].shape)})")
                continue
            tensor = adapted
        own[key] = tensor.to(own[key].dtype)
        loaded.append(key)
    if not loaded:
        raise WeightsError(f"{source}: no tensor matches this model by name and shape; "
                           f"first names in the file: {', '.join(list(state)[:5])}")
    model.load_state_dict(own)
    return {"loaded": loaded, "skipped": skipped}


def freeze_backbone(model: nn.Module) -> int:
    """Stop gradients to everything but `model.head` (BN statistics of the backbone freeze too).

    Returns the number of trainable parameters left.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()  # train() is re-applied each epoch; see train.loop which keeps it frozen
    model.frozen_backbone = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
