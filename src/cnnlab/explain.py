"""Seeing why: Grad-CAM heatmaps (Selvaraju et al. 2017) for any convolutional model.

The last convolution layer is found by itself (the last nn.Conv2d the model registers: the paper nets'
only conv, VGG's last, ResNet's layer4, EfficientNet-Lite's head conv); its activations A (B, C, h, w) and
their gradients for the predicted (or a given) class give weights α_c = mean over (h, w) of ∂y/∂A_c, and
the map is ReLU(Σ_c α_c A_c), upsampled to the image and scaled to [0, 1]. Whole batches at once. Only
∂y/∂A is needed, so the layers before A run without a graph and the backward stops at A: for a head-only
EfficientNet-Lite0 on flowers12 the report's heatmaps took 8.7 s when the backward ran down to the image.

Used by the report (heatmaps over its prediction grid and most-confident mistakes) and by
`cnnlab explain RUN IMAGE…`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models.fused import unfolded_batch_norm


def last_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's last registered convolution (None for a model with none, such as the MLP)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
             batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(heatmaps (B, H, W) in [0, 1], probabilities (B, classes)) for normalised inputs x (B, C, H, W).

    target: the class explained per image (default: the predicted one). Raises ValueError for a model
    without a convolution."""
    layer = last_conv(model)
    if layer is None:
        raise ValueError("this model has no convolution layer: Grad-CAM needs one")
    model.eval()
    store: dict = {}

    def keep(module, inputs, output):
        # A as a leaf that needs a gradient (whether or not the weights do): the backward stops here. From here
        # on the forward records a graph (grad mode, off for the layers before A, is switched on for the rest
        # of this forward; the no_grad block below restores it). The next layers get a copy: the map takes its
        # values as they leave it (an in-place ReLU right after the convolution, as in the papers' nets,
        # rectifies them), the gradient is the one arriving at the convolution's output.
        a = output.detach().requires_grad_(True)
        torch.set_grad_enabled(True)
        store["a"], store["out"] = a, a.clone()
        return store["out"]

    handle = layer.register_forward_hook(keep)
    cams, probs = [], []
    try:
        with unfolded_batch_norm(layer):  # the layer's own output, not batch norm folded into it
            for s in range(0, len(x), batch_size):
                store.clear()
                with torch.no_grad():
                    logits = model(x[s:s + batch_size]).float()
                    if "a" not in store:
                        raise RuntimeError(f"Grad-CAM: the model's forward did not run its last convolution "
                                           f"({type(layer).__name__}) as a module")
                    t = logits.argmax(1) if target is None else target[s:s + batch_size].to(logits.device)
                    model.zero_grad(set_to_none=True)
                    logits.gather(1, t.view(-1, 1)).sum().backward()
                a, g = store["out"].detach().float(), store["a"].grad.float()
                cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
                cams.append((cam / peak).cpu())
                probs.append(logits.detach().softmax(1).cpu())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return torch.cat(cams), torch.cat(probs)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(C, H, W) uint8 image and (H, W) heatmap in [0, 1] → (H, W, 3) uint8: the image under a jet heatmap."""
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, 0) if image.shape[0] == 1 else image[:3]
    heat = colormaps["jet"](cam)[..., :3] * 255
    out = (1 - alpha) * rgb.transpose(1, 2, 0).astype(np.float32) + alpha * heat
    return out.clip(0, 255).astype(np.uint8)


def explain_files(run, paths, out_dir: str | Path | None = None, top_k: int = 3,
                  target: str | None = None) -> list[dict]:
    """Grad-CAM for image files with a saved run: [{file, top, explained, figure} | {file, error}].

    Each figure (<out_dir>/<file stem>.gradcam.png, default: beside the run in explain/) shows the image as
    the network saw it and its heatmap for the predicted class (or `target`)."""
    from .data.images import BadImage, decode_image
    from .data.loader import Normalizer
    from .inference import collect_images
    from .report.plots import explanation_figure

    meta, model = run.meta, run.model
    classes = meta["classes"]
    if target is not None and target not in classes:
        raise ValueError(f"--class {target!r} is not one of the model's classes: {', '.join(classes)}")
    out_dir = Path(out_dir) if out_dir is not None else Path(run.path) / "explain"
    normalize = Normalizer(meta["mean"], meta["std"])
    results = []
    for f in collect_images(paths):
        try:
            img = decode_image(f, meta["image_size"], meta["in_channels"], meta.get("resize", "stretch"))
        except BadImage as e:
            results.append({"file": str(f), "error": str(e)})
            continue
        x = normalize(torch.from_numpy(img)[None])
        t = torch.tensor([classes.index(target)]) if target is not None else None
        cam, probs = grad_cam(model, x, t)
        p, i = probs[0].topk(min(top_k, len(classes)))
        top = [{"class": classes[c], "probability": round(q, 6)} for q, c in zip(p.tolist(), i.tolist())]
        explained = target or top[0]["class"]
        figure = explanation_figure(img, overlay(img, cam[0].numpy()), f"{f.name}",
                                    f"{explained} ({probs[0, classes.index(explained)]:.2f})",
                                    out_dir / f"{f.stem}.gradcam.png")
        results.append({"file": str(f), "top": top, "explained": explained, "figure": str(figure)})
    return results
