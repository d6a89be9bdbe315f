"""The fast path computes what the plain (tutorial) path computes; its switches still learn.

Fast: device-resident uint8 splits normalised per batch, whole-batch augmentation, channels-last.
Plain: torchvision per-sample transforms (PIL → ToTensor → Normalize) in a DataLoader, NCHW.
"""

from __future__ import annotations

import copy
import os
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from cnnlab.data.augment import augment_batch
from cnnlab.data.loader import DeviceLoader
from cnnlab.data.stream import fit_normalizer
from cnnlab.models import create_model
from cnnlab.training.runtime import Runtime

from conftest import fit_run


@pytest.fixture(scope="module")
def shapes():
    from cnnlab.data import load_source

    return load_source("animal-shapes", max_per_class=40, progress=False)  # 400 real silhouettes


def _plain_batch(images: torch.Tensor, labels: torch.Tensor, mean, std):
    class Arrays(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return T.Compose([T.ToTensor(), T.Normalize(mean, std)])(Image.fromarray(images[i, 0].numpy())), \
                int(labels[i])

    return next(iter(DataLoader(Arrays(), batch_size=len(labels), shuffle=False)))


def test_fast_and_plain_paths_give_the_same_batch_loss_and_gradients(shapes):
    idx = torch.arange(0, 400, 3)[:128]
    images, labels = shapes.images[idx], shapes.labels[idx]
    norm = fit_normalizer(shapes.images)
    x_plain, y_plain = _plain_batch(images, labels, norm.mean, norm.std)
    fast = DeviceLoader(images, labels, norm, 128, channels_last=True)
    (x_fast, y_fast), = list(fast)
    assert x_fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x_fast, x_plain, rtol=0, atol=2e-6)  # same normalisation, fused into one op
    assert torch.equal(y_fast, y_plain)

    torch.manual_seed(0)
    plain_model = create_model("harahap-cnn", 10, 1, 28).eval()  # eval: dropout off, same function
    fast_model = copy.deepcopy(plain_model).to(memory_format=torch.channels_last)
    losses, grads = [], []
    for model, x, y in ((plain_model, x_plain, y_plain), (fast_model, x_fast, y_fast)):
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_channels_last_flatten_keeps_values_order_and_gradient_format():
    from cnnlab.models.papers import Flatten

    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = Flatten()(x)
    assert torch.equal(y, nn.Flatten()(x.detach()))  # (C, H, W) order: the dense weights mean the same
    y.backward(torch.arange(y.numel(), dtype=torch.float32).view_as(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x.grad, torch.arange(y.numel(), dtype=torch.float32).view(4, 3, 5, 5))
    assert torch.equal(Flatten(2)(x.detach()), nn.Flatten(2)(x.detach()))


def _blob(n: int, side: int = 28) -> torch.Tensor:
    """n copies of a 4×4 bright square in the middle of a dark image."""
    x = torch.zeros(n, 1, side, side)
    c = side // 2
    x[:, :, c - 2:c + 2, c - 2:c + 2] = 1.0
    return x


def _centroid(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    m = x[:, 0].sum((1, 2))
    return torch.stack([(x[:, 0] * xs).sum((1, 2)) / m, (x[:, 0] * ys).sum((1, 2)) / m], 1)


def test_translation_is_uniform_within_its_bound():
    x = _blob(4000)
    y = augment_batch(x, torch.Generator().manual_seed(0), translate=0.1)
    shift = _centroid(y) - _centroid(x)  # pixels; the bound is 0.1 × 28 = 2.8 px
    assert float(shift.abs().max()) <= 2.8 + 0.05
    # uniform on [-2.8, 2.8]: mean 0, standard deviation 2.8 / √3 = 1.617, in both directions
    assert shift.mean(0).abs().max() < 0.08
    torch.testing.assert_close(shift.std(0), torch.full((2,), 2.8 / math.sqrt(3)), rtol=0.04, atol=0)


def test_rotation_angles_are_uniform_within_their_bound():
    x = torch.zeros(3000, 1, 41, 41)
    x[:, :, 19:22, 4:37] = 1.0  # a horizontal bar
    y = augment_batch(x, torch.Generator().manual_seed(1), rotation=10)
    ys, xs = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    w = y[:, 0]
    m = w.sum((1, 2))
    cx, cy = (w * xs).sum((1, 2)) / m, (w * ys).sum((1, 2)) / m
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    sxx, syy, sxy = (w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * sxy, sxx - syy))  # the bar's orientation
    assert float(angle.abs().max()) <= 10.3
    assert abs(float(angle.mean())) < 0.3
    assert float(angle.std()) == pytest.approx(10 / math.sqrt(3), rel=0.05)  # uniform on ±10°


def test_zoom_scales_the_blob_area_within_its_bound():
    x = _blob(3000)
    y = augment_batch(x, torch.Generator().manual_seed(2), scale=0.2)
    ratio = y.sum((1, 2, 3)) / x.sum((1, 2, 3))  # area scales by 1 / zoom² for zoom in [0.8, 1.2]
    assert float(ratio.min()) > 1 / 1.2 ** 2 - 0.05 and float(ratio.max()) < 1 / 0.8 ** 2 + 0.05
    assert float(ratio.min()) < 0.75 and float(ratio.max()) > 1.45  # the whole range is used


# fp32: these tests compare the fast path with the tutorial one to float32 rounding (bf16, where the CPU makes
# it the default, rounds far more coarsely; test_precision covers it)
TINY = {"train.precision": "32", "data.max_per_class": 100, "data.batch_size": 64, "train.epochs": 3, "train.seed": 0,
        "optim.lr": 0.003}


def test_bf16_mixed_precision_still_learns(tmp_path):
    fp32 = fit_run(TINY, out=tmp_path / "fp32")
    bf16 = fit_run(dict(TINY, **{"train.precision": "bf16-mixed"}), out=tmp_path / "bf16")
    assert bf16.env["precision"] == "bf16-mixed"
    # 10 classes (chance 0.1), 150 test images: both learn, and to about the same place
    assert bf16.metrics["accuracy"] > 0.6 and fp32.metrics["accuracy"] > 0.6
    assert abs(bf16.metrics["accuracy"] - fp32.metrics["accuracy"]) < 0.1
    assert bf16.history[-1]["loss"] < bf16.history[0]["loss"]


def test_bf16_loss_on_a_batch_is_close_to_fp32(shapes):
    norm = fit_normalizer(shapes.images)
    (x, y), = list(DeviceLoader(shapes.images[:128], shapes.labels[:128], norm, 128))
    torch.manual_seed(0)
    model = create_model("harahap-cnn", 10, 1, 28).eval()
    rt32, rt16 = Runtime("cpu", "32"), Runtime("cpu", "bf16-mixed")
    with rt32.autocast():
        l32 = F.cross_entropy(model(x).float(), y).item()
    with rt16.autocast():
        out = model(x)
        l16 = F.cross_entropy(out.float(), y).item()
    assert out.dtype == torch.bfloat16
    assert l16 == pytest.approx(l32, rel=0.02)


def test_channels_last_is_the_cpu_default_and_can_be_turned_off(tmp_path):
    assert Runtime("cpu").channels_last is True
    assert Runtime("cpu", channels_last=False).channels_last is False
    a = fit_run(dict(TINY, **{"train.epochs": 1}), out=tmp_path / "cl")
    b = fit_run(dict(TINY, **{"train.epochs": 1, "train.channels_last": False}), out=tmp_path / "nchw")
    assert a.env["channels_last"] is True and b.env["channels_last"] is False
    # the same function of the same weights: losses agree to float rounding, not bit for bit
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-3)


def test_compiled_model_computes_what_the_eager_one_does_and_trains(shapes, tmp_path):
    pytest.importorskip("torch._inductor")
    norm = fit_normalizer(shapes.images)
    (x, y), = list(DeviceLoader(shapes.images[:128], shapes.labels[:128], norm, 128, channels_last=True))
    torch.manual_seed(0)
    eager = create_model("harahap-cnn", 10, 1, 28).eval().to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    losses = []
    for model in (eager, compiled):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (k, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
    # a whole run with train.compile: it learns, and its saved model is the eager module's state
    run = fit_run(dict(TINY, **{"train.compile": True}), out=tmp_path / "compiled")
    assert run.metrics["accuracy"] > 0.6
    folder = run.env["defaults_because"]["compile_cache"].split(": ")[0]  # its code kept apart per instruction set
    assert os.path.isdir(folder) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    from cnnlab.runs import load_run

    again = load_run(run.path)
    assert not any(k.startswith("_orig_mod") for k in again.model.state_dict())


def test_big_images_are_inferred_in_passes_under_the_mmap_limit_with_the_same_logits():
    """An ImageNet backbone at 224 px goes through in chunks whose largest activation stays under glibc's 32 MiB
    mmap threshold (a bigger block is faulted in afresh every pass); the papers' small nets keep their batch.
    The chunked logits are the whole batch's."""
    from cnnlab.data.loader import Normalizer
    from cnnlab.training.loop import predict_logits
    from cnnlab.training.runtime import MMAP_THRESHOLD, inference_chunk

    runtime = Runtime("cpu", precision="32", channels_last=True)
    small = create_model("harahap-cnn", 10, 1, 28).eval()
    assert inference_chunk(small, torch.zeros(128, 1, 28, 28), runtime) == 128
    big = create_model("efficientnet-lite0", 5, 3, 224).eval().to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 224, 224), dtype=torch.uint8)
    x = Normalizer([0.5] * 3, [0.5] * 3)(images).contiguous(memory_format=torch.channels_last)
    n = inference_chunk(big, x, runtime)
    assert 1 <= n < 24
    # the largest activation: the first block's 1×1 expansion, 96 channels at 112×112 in fp32
    assert n * 96 * 112 * 112 * 4 <= MMAP_THRESHOLD < (n + 1) * 96 * 112 * 112 * 4 / 0.9
    loader = DeviceLoader(images, torch.arange(24) % 5, Normalizer([0.5] * 3, [0.5] * 3), 24, channels_last=True)
    logits, labels = predict_logits(big, loader, runtime)
    with torch.no_grad():
        whole = big(x)
    assert torch.equal(labels, torch.arange(24) % 5)
    assert torch.allclose(logits, whole, atol=1e-4, rtol=1e-4)
