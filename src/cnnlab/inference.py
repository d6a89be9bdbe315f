"""Classify image files with a saved run: same decoding, size, channels and normalisation as training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.loader import Normalizer
from .data.images import IMAGE_EXTENSIONS, BadImage, decode_image


def collect_images(paths) -> list[Path]:
    """Files as given; folders searched recursively for image files (hidden files skipped)."""
    out = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                          and not f.name.startswith("."))
        else:
            out.append(p)
    return out


@torch.no_grad()
def predict_files(run, paths, top_k: int = 3, device: str = "cpu", batch_size: int = 256) -> list[dict]:
    """[{file, top: [{class, probability}…]} | {file, error}] in input order."""
    model = run.model.to(device).eval()
    return classify_files(paths, run.meta, lambda x: model(x.to(device)).float().cpu(), top_k, batch_size)


@torch.no_grad()
def classify_files(paths, meta: dict, logits_of, top_k: int = 3, batch_size: int = 256) -> list[dict]:
    """Decode the image files as training did (meta: classes, image_size, in_channels, resize, mean, std),
    normalise them with the run's own statistics, and take the top-k classes of `logits_of(x)` — a PyTorch
    model, or ONNX Runtime (export.predict_onnx). [{file, top: [{class, probability}…]} | {file, error}]."""
    normalize = Normalizer(meta["mean"], meta["std"])  # the training run's own statistics and arithmetic
    k = min(top_k, len(meta["classes"]))
    results, batch, where = [], [], []

    def flush():
        if not batch:
            return
        probs = torch.softmax(logits_of(normalize(torch.from_numpy(np.stack(batch)))), 1)
        p, i = probs.topk(k, 1)
        for row, (pv, iv) in zip(where, zip(p.tolist(), i.tolist())):
            results[row]["top"] = [{"class": meta["classes"][c], "probability": round(q, 6)} for q, c in zip(pv, iv)]
        batch.clear()
        where.clear()

    for f in collect_images(paths):
        results.append({"file": str(f)})
        try:
            if not f.exists() and not f.is_symlink():
                raise BadImage("no such file")
            batch.append(decode_image(f, meta["image_size"], meta["in_channels"], meta.get("resize", "stretch")))
            where.append(len(results) - 1)
        except BadImage as e:
            results[-1]["error"] = str(e)
        if len(batch) >= batch_size:
            flush()
    flush()
    return results
