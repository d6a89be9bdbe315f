"""The CPU fast path's hand-written parts compute what the modules and torch's optimisers compute:
the fused ReLU → batch norm → max-pool block, the fused optimiser step, and the malloc setting."""

from __future__ import annotations

import copy
import os
import json
import re
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.models import create_model, set_fusion
from cnnlab.models.fused import FusedSequential, _NativeConvMaxPoolReLU, _NativeConvReLU
from cnnlab.training.optim import build_optimizer


def _block(c: int, momentum: float | None = 0.1) -> tuple[nn.Sequential, FusedSequential]:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(c, momentum=momentum),
                          nn.MaxPool2d(2))
    with torch.no_grad():
        plain[2].weight.uniform_(0.2, 2.0)
        plain[2].bias.normal_()
    fused = FusedSequential(*copy.deepcopy(list(plain)))
    return plain, fused


def _uses_fused(out: torch.Tensor) -> bool:
    return "ReLUBatchNormMaxPool" in type(out.grad_fn).__name__


def _native_here() -> bool:
    from cnnlab.models import native

    return native.library() is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("channels_last,native", [(True, True), (True, False), (False, None)])  # native: channels-last
@pytest.mark.parametrize("size", [8, 9])  # 9: max-pool drops the last row and column, batch norm still counts them
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_block_matches_modules(channels_last, native, size, momentum):
    plain, fused = _block(6, momentum)
    set_fusion(fused, None, native)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, fused = plain.to(memory_format=fmt), fused.to(memory_format=fmt)
    for step in range(3):  # running statistics accumulate over steps
        x = torch.randn(5, 2, size, size, generator=torch.Generator().manual_seed(step)).contiguous(memory_format=fmt)
        g = torch.randn(5, 6, size // 2, size // 2, generator=torch.Generator().manual_seed(99 + step))
        out_p, out_f = plain(x), fused(x)
        assert _uses_fused(out_f) and not _uses_fused(out_p)
        assert ("Native" in type(out_f.grad_fn).__name__) == bool(native and _native_here())
        assert out_f.is_contiguous(memory_format=fmt)
        assert _close(out_f, out_p, 1e-5)
        (out_p * g).sum().backward()
        (out_f * g).sum().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        assert _close(a.grad, b.grad), name
    for (name, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b) if name.endswith("num_batches_tracked") else _close(a, b, 1e-6), name


def test_input_gradient_matches():
    plain, fused = _block(4)
    x = torch.randn(3, 2, 10, 10)
    y_p = plain[0](x).detach().requires_grad_()
    y_f = y_p.detach().clone().requires_grad_()
    out_p = plain[3](plain[2](plain[1](y_p.clone())))
    out_f = FusedSequential(*list(fused)[1:])(y_f.clone())
    assert _uses_fused(out_f)
    g = torch.randn_like(out_p)
    (out_p * g).sum().backward()
    (out_f * g).sum().backward()
    assert _close(y_f.grad, y_p.grad, 1e-5)
    assert (y_f.grad[y_p <= 0] == 0).all()  # the ReLU mask


def test_gamma_not_positive_eval_and_no_grad_take_the_module_path():
    plain, fused = _block(4)
    x = torch.randn(3, 2, 8, 8)
    for gamma in (-0.5, 0.0):  # γ < 0: pooling first would pick the wrong max; γ = 0: a tie broken differently
        with torch.no_grad():
            fused[2].weight[1] = plain[2].weight[1] = gamma
        out = fused(x)
        assert not _uses_fused(out) and torch.equal(out, plain(x))
    with torch.no_grad():
        fused[2].weight[1] = plain[2].weight[1] = 0.5
    fused.eval(), plain.eval()
    assert torch.equal(fused(x), plain(x))  # eval: running statistics, the modules' own kernels
    fused.train(), plain.train()
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


def test_only_the_exact_pattern_fuses():
    conv = nn.Conv2d(1, 4, 3)
    cases = {"relu not in place": [conv, nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2)],
             "3×3 pool": [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(4), nn.MaxPool2d(3)],
             "ceil mode": [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(4), nn.MaxPool2d(2, ceil_mode=True)],
             "no affine": [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(4, affine=False), nn.MaxPool2d(2)],
             "bn first": [conv, nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2)]}
    for name, layers in cases.items():
        assert not _uses_fused(FusedSequential(*layers)(torch.randn(2, 1, 9, 9))), name
    seq = FusedSequential(conv, nn.ReLU(inplace=True), nn.BatchNorm2d(4), nn.MaxPool2d(2))
    assert _uses_fused(seq(torch.randn(2, 1, 9, 9)))
    assert set_fusion(seq, False) == 1 and not _uses_fused(seq(torch.randn(2, 1, 9, 9)))
    assert set_fusion(seq, None) == 1 and _uses_fused(seq(torch.randn(2, 1, 9, 9)))  # None: on the CPU


def test_fused_and_kept_memory_are_the_cpu_defaults_and_can_be_turned_off(tmp_path):
    from conftest import fit_run

    tiny = {"data.max_per_class": 100, "data.batch_size": 64, "train.epochs": 1, "train.seed": 0, "optim.lr": 0.003,
            "model.name": "harahap-cnn", "train.precision": "32"}  # fp32: bf16's rounding differs by path (test_native)
    a = fit_run(tiny, out=tmp_path / "fused")
    b = fit_run(dict(tiny, **{"train.fused": False, "train.reuse_memory": False}), out=tmp_path / "plain")
    assert a.env["fused"] is True and a.env["reuse_memory"] is True
    assert b.env["fused"] is False and b.env["reuse_memory"] is False
    # and what the flags say is what training builds: the model's fused blocks and the optimiser's step
    from cnnlab.experiment import build_experiment
    from cnnlab.config import load_config
    from cnnlab.training.progress import ProgressLogger

    for overrides, on in ((tiny, True), (dict(tiny, **{"train.fused": False}), False)):
        built = build_experiment(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), ProgressLogger("none"))
        assert built.model.backbone.fuse is on and bool(built.optimizer.defaults.get("fused")) is on
    # the same function of the same weights: losses agree to float rounding, not bit for bit
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-3)


def test_papers_nets_keep_their_state_dict_and_fuse():
    m = create_model("harahap-cnn", num_classes=10, in_channels=1, image_size=28)
    assert list(m.state_dict()) == ["backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias",
                                    "backbone.2.running_mean", "backbone.2.running_var",
                                    "backbone.2.num_batches_tracked", "head.1.weight", "head.1.bias",
                                    "head.4.weight", "head.4.bias"]
    assert set_fusion(m, True) == 1
    a = create_model("alkhairi-cnn", num_classes=5, in_channels=3, image_size=64, batch_norm=True)
    assert set_fusion(a, True) == 1 and _uses_fused(a.backbone[:4](torch.randn(2, 3, 64, 64)))


@pytest.mark.parametrize("native", [True, False])
def test_one_training_step_fused_equals_unfused(native):
    """The first paper's net on a real batch (the built-in silhouettes): same loss, same gradients, through the
    native kernels (where they build) and the torch-op path."""
    from cnnlab.data import load_source

    ds = load_source("animal-shapes", max_per_class=13)
    x = (torch.as_tensor(ds.images[:128]).float() / 255 - 0.2) / 0.4
    y = torch.as_tensor(ds.labels[:128])
    torch.manual_seed(0)
    m = create_model("harahap-cnn", num_classes=10, in_channels=1, image_size=28).to(memory_format=torch.channels_last)
    grads = {}
    for fuse in (False, True):
        model = copy.deepcopy(m)
        set_fusion(model, fuse, native)
        torch.manual_seed(1)  # the same dropout mask
        features = model.backbone(x.contiguous(memory_format=torch.channels_last))
        assert _uses_fused(features) == fuse  # each path is the one asked for
        assert ("Native" in type(features.grad_fn).__name__) == (fuse and native and _native_here())
        loss = F.cross_entropy(model.head(features), y)  # = model(x)
        loss.backward()
        grads[fuse] = (loss.item(), {n: p.grad for n, p in model.named_parameters()},
                       model.backbone[2].running_var.clone())
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    for n, g in grads[False][1].items():
        assert _close(grads[True][1][n], g), n
    # the running variance against float64 arithmetic: torch's float32 statistics are off by ~3e-5 here,
    # the native kernels' double sums by float rounding only
    conv = m.backbone[0](x.contiguous(memory_format=torch.channels_last)).detach().relu().double()
    truth = (0.9 + 0.1 * conv.var((0, 2, 3), unbiased=True)).float()
    assert _close(grads[False][2], truth, 1e-4)
    assert _close(grads[True][2], truth, 1e-6 if native and _native_here() else 1e-4)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_relu_then_pool_pools_first_with_the_same_values_and_gradients_bit_for_bit(autocast, native, monkeypatch):
    """The second paper's net (batch norm off): ReLU → max-pool 2×2 runs as pool → ReLU on the fused path (the
    native kernels or torch's), with identical outputs and gradients, ties and all-negative windows included
    (inputs on a coarse grid). Its second convolution stays torch's here: the bf16 dot-product one rounds its
    own way (tests/test_native.py checks it against an exact bf16 convolution)."""
    monkeypatch.setattr(_NativeConvReLU, "enabled", False)
    fused_fn = "_NativeMaxPoolReLUBackward" if native and _native_here() else "ReluBackward0"
    torch.manual_seed(0)
    m = create_model("alkhairi-cnn", num_classes=5, in_channels=3, image_size=32).to(memory_format=torch.channels_last)
    x0 = (torch.randint(-4, 5, (16, 3, 32, 32)).float() / 4).contiguous(memory_format=torch.channels_last)
    y = torch.arange(16) % 5
    out = {}
    for fuse in (False, True):
        model = copy.deepcopy(m)
        set_fusion(model, fuse, native)
        x = x0.clone().requires_grad_()  # an input gradient: the stem's weight-only backward does not apply
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            head3 = model.backbone[:3]  # conv → ReLU → pool (a slice: a new FusedSequential, told the same)
            head3.fuse, head3.native = fuse, native
            block = head3(x)
            assert type(block.grad_fn).__name__ == (fused_fn if fuse else "MaxPool2DWithIndicesBackward0")
            torch.manual_seed(1)  # the same dropout mask
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        out[fuse] = (block, loss, {n: p.grad for n, p in model.named_parameters()}, x.grad)
    assert (out[True][0] == 0).any() and torch.equal(out[True][0], out[False][0])
    assert torch.equal(out[True][1], out[False][1])
    for n, g in out[False][2].items():
        assert torch.equal(out[True][2][n], g), n
    assert torch.equal(out[True][3], out[False][3])


@pytest.mark.parametrize("autocast", [False, True])
def test_the_second_papers_stem_takes_its_weight_gradient_from_the_pooled_one(autocast, monkeypatch):
    """Its first convolution's input (the image batch) needs no gradient, so the native path (where the kernels
    build) runs conv → ReLU → max-pool in one native pass forward (summing the convolution in its own order) and
    with a backward that forms the weights' gradient from the pooled gradient at each window's max: the same
    loss and gradients for every later layer as the modules' but for that order (float32 to 1e-6 and 1e-5; in
    bf16 1e-3 and 1 %, where a sum on a rounding boundary may round the other way), and the stem's own
    gradients as the modules' (float32 to 1e-5; in bf16, summed from unrounded pixels, within 2.5 % of torch's
    bf16 ones, which pick the same maxima, and about as far from float32's as they are). On real images: the
    built-in silhouettes at 32×32×3."""
    from cnnlab.data import load_source

    if not _native_here():
        if os.environ.get("CI") == "true":
            pytest.fail("the native kernels must build on CI")
        pytest.skip("no native kernels here")
    monkeypatch.setattr(_NativeConvMaxPoolReLU, "enabled", True)  # checked on every CPU, by default or not
    ds = load_source("animal-shapes-5", max_per_class=26, image_size=32, channels=3)
    x = ((torch.as_tensor(ds.images[:128]).float() / 255 - 0.2) / 0.4).contiguous(memory_format=torch.channels_last)
    y = torch.as_tensor(ds.labels[:128])
    torch.manual_seed(0)
    m = create_model("alkhairi-cnn", num_classes=5, in_channels=3, image_size=32).to(memory_format=torch.channels_last)
    out = {}
    for fuse, bf16 in ((False, False), (False, autocast), (True, autocast)):
        model = copy.deepcopy(m)
        set_fusion(model, fuse, True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            stem = model.backbone[:3]  # conv → ReLU → pool (a slice: a new FusedSequential, told the same)
            stem.fuse, stem.native = fuse, True
            block = stem(x)
            assert type(block.grad_fn).__name__ == ("_NativeConvMaxPoolReLUBackward" if fuse else
                                                    "MaxPool2DWithIndicesBackward0")
            torch.manual_seed(1)  # the same dropout mask
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        out[fuse, bf16] = (loss, {n: p.grad for n, p in model.named_parameters()})
    fused, modules, exact = out[True, autocast], out[False, autocast], out[False, False]
    assert _rel(fused[0], modules[0]) < (1e-6 if not autocast else 1e-3)
    for n, g in modules[1].items():
        if n.startswith("backbone.0."):
            ours, theirs = _rel(fused[1][n], exact[1][n]), _rel(g, exact[1][n])
            # the same maxima as the modules': bf16 to 1 % on AVX-512 BF16, 1.5 % on a Zen 3 (AVX2), where torch's
            # emulated bf16 weight gradient lay further from float32's (3.3 %) than the native one (2.9 %)
            assert _rel(fused[1][n], g) < (1e-5 if not autocast else 0.025), n
            assert ours <= 1.5 * theirs + 1e-5, (n, ours, theirs)  # bf16's own maxima: about as far from fp32's
        else:
            assert _rel(fused[1][n], g) < (1e-5 if not autocast else 0.01), n


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizer_step_matches(name):
    torch.manual_seed(0)
    net = nn.Linear(20, 5)
    params = {}
    for fused in (False, True):
        model = copy.deepcopy(net)
        opt = build_optimizer(model.parameters(), name, 0.01, weight_decay=1e-3, fused=fused)
        assert bool(opt.defaults.get("fused")) == fused
        for step in range(3):
            model.zero_grad()
            model(torch.randn(8, 20, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            opt.step()
        params[fused] = [p.detach() for p in model.parameters()]
    for a, b in zip(params[True], params[False]):
        assert _close(a, b, 1e-5)


def test_rmsprop_has_no_fused_step():
    opt = build_optimizer(nn.Linear(2, 2).parameters(), "rmsprop", 0.01, fused=True)
    assert not opt.defaults.get("fused")


_FAULTS = """
import ctypes, json, resource, sys, torch
import torch.nn.functional as F
from cnnlab.models import create_model
from cnnlab.training.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "on" else False
if sys.argv[1] == "static":  # glibc's documented 128 KiB thresholds, set explicitly: its dynamic adjustment is off
    mallopt = ctypes.CDLL(None).mallopt
    assert mallopt(-3, 128 * 1024) and mallopt(-1, 128 * 1024)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
torch.manual_seed(0)
torch.set_num_threads(1)  # one thread: allocation from one arena, in one order
model = create_model("harahap-cnn", num_classes=10, in_channels=1, image_size=28)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([kept, faults[5:]]))  # after 5 warm-up steps
"""


def test_keep_freed_memory_stops_the_page_faults():
    """Training steps of the first paper's net (batch 128) in fresh processes: the page faults of each step
    after a warm-up, with glibc's thresholds as documented (128 KiB, set explicitly), with glibc's defaults
    (the same thresholds, adjusted at run time) and with keep_freed_memory()."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    def measure(mode: str) -> tuple[bool, list[int]]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        kept, faults = json.loads(out.stdout)
        return kept, faults

    activation_pages = 128 * 32 * 28 * 28 * 4 // 4096  # one 32-channel 28×28 activation of the batch
    # glibc's documented thresholds: every step maps its activations afresh and faults them in (~7× those pages)
    static = measure("static")[1]
    assert min(static) > activation_pages, static
    # the kept heap: steps served from memory already faulted in; now and then one grows the heap once more
    # (seen: a few hundred to a few thousand faults in 1–4 steps of 25), so the typical step faults none
    kept, on = measure("on")
    assert kept, "mallopt was not accepted"
    assert statistics.median(on) <= 8, on
    assert sum(f > 64 for f in on) <= len(on) // 4, on
    assert sum(on) * 10 < sum(static), (on, static)
    # glibc's own run-time adjustment drifts between processes (seen: from re-faulting most steps to settling into
    # the heap for a stretch of 20 steps): up to 3 processes for one that shows more faults than the kept heap
    off = [measure("off")[1]]
    while sum(off[-1]) <= sum(on) and len(off) < 3:
        off.append(measure("off")[1])
    assert max(sum(f) for f in off) > sum(on), (off, on)


def test_depthwise_convolutions_train_in_fp32_under_cpu_bf16_autocast():
    """CpuConv2d: a strided / 5×5 depthwise layer computes in fp32 when it trains under bf16 autocast on the CPU
    (torch's bf16 backward kernels for those are several times slower); its gradients are the fp32 layer's.
    3×3 stride-1 layers, inference and `train.fused=false` keep the plain bf16 path; state-dict keys stay."""
    from cnnlab.models.fused import CpuConv2d

    m = create_model("mobilenet-v3-small", num_classes=5, in_channels=3, image_size=64)
    plain = [n for n, mod in m.named_modules() if isinstance(mod, CpuConv2d) and mod.groups > 1]
    assert plain and all(type(mod) is CpuConv2d for n, mod in m.named_modules() if n in plain)
    torch.manual_seed(0)
    conv = CpuConv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False)
    ref = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(4, 8, 17, 17).contiguous(memory_format=torch.channels_last)
    xb = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(xb)
    assert y.dtype == torch.float32  # computed in fp32
    y.square().sum().backward()
    x32 = xb.detach().float().requires_grad_()
    ref(x32).square().sum().backward()
    assert torch.allclose(conv.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(xb.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)  # the input's gradient, back in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert conv(xb).dtype == torch.bfloat16  # inference: the bf16 path
        conv.requires_grad_(False)
        assert conv(xb.detach()).dtype == torch.bfloat16  # frozen (a backbone under a head): the same
        conv.requires_grad_(True)
        set_fusion(nn.Sequential(conv), False)
        assert conv(xb).dtype == torch.bfloat16  # switched off
        set_fusion(nn.Sequential(conv), None)
        three = CpuConv2d(8, 8, 3, padding=1, groups=8)
        assert three(xb).dtype == torch.bfloat16  # 3×3 stride 1: bf16 is fast there
        assert conv(xb).dtype == torch.float32


def test_same_padding_is_tensorflows_on_any_size():
    """EfficientNet-Lite's SameConv2d (symmetric padding given to the convolution, the asymmetric kind padded)
    equals an explicit TF-style pad then a valid convolution, for odd and even sizes and both strides."""
    import math

    from cnnlab.models.efficientnet import SameConv2d

    torch.manual_seed(0)
    for k, s, groups in ((3, 1, 4), (5, 1, 4), (3, 2, 4), (5, 2, 4), (1, 1, 1), (3, 2, 1)):
        conv = SameConv2d(4, 4, k, stride=s, groups=groups, bias=False)
        for size in (13, 14, 28):
            x = torch.randn(2, 4, size, size)
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            want = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, None, s, 0, 1, groups)
            got = conv(x)
            assert got.shape[-1] == math.ceil(size / s)
            assert torch.allclose(got, want, atol=1e-5), (k, s, size)


@pytest.mark.parametrize("channels_last,autocast", [(True, False), (True, True), (False, False)])
def test_lite_inference_writes_relu6_into_the_padded_input_with_the_same_values(channels_last, autocast, monkeypatch):
    """At inference (no autograd) an MBConv writes its expand ReLU6 straight into the stride-2 depthwise layer's
    zero-bordered padded input where that padding is asymmetric, and runs its other ReLU6s in place: the
    backbone's features are bit for bit those of the path autograd takes (F.relu6, then F.pad's copy), in fp32
    and under bf16 autocast, NCHW or channels-last, on even sides (every stride-2 layer padded asymmetrically)
    and odd ones (a 3×3 stride-2 layer pads an odd side symmetrically) — and no padded buffer is left on a
    layer after the pass; train.fused=false (set_fusion) turns it off. A traced export takes the plain path (its
    graph has no in-place or out= writes)."""
    from cnnlab.models.efficientnet import SameConv2d

    net = _with_statistics().backbone.eval().requires_grad_(False)  # frozen: grad mode runs the same bf16 kernels
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    calls = []  # per convolution: whether it took a prepadded input
    original = SameConv2d._conv

    def spy(self, xin, weight, bias):
        calls.append(self.__dict__.get("_prepadded", (None,))[0] is xin)
        return original(self, xin, weight, bias)

    monkeypatch.setattr(SameConv2d, "_conv", spy)

    def features(x: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return net(x.clone()).float()

    for (h, w), prepadded in (((64, 96), 4), ((70, 66), 1)):
        x = torch.randn(3, 3, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        calls.clear()
        want = features(x, grad=True)
        assert not any(calls)
        got = features(x, grad=False)
        assert sum(calls) == prepadded, (h, w)  # all four stride-2 depthwise layers; on 70×66 only the one at 18×17
        assert torch.equal(got, want), (h, w)
        assert not any("_prepadded" in m.__dict__ for m in net.modules())
    set_fusion(net, False)  # train.fused=false: torch's way, F.relu6 then F.pad
    calls.clear()
    features(x, grad=False)
    assert calls and not any(calls)
    set_fusion(net, None)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
    ops = re.findall(r"aten::\w+", str(traced.inlined_graph))
    assert ops.count("aten::relu6") == 33 and ops.count("aten::pad") == prepadded + 1 and "aten::clamp" not in ops \
        and not any(op.endswith("_") for op in ops), sorted(set(ops))  # the stem pads too
    with torch.no_grad():  # the trace is fp32 (autocast is not traced)
        assert torch.equal(traced(x), net(x.clone()))


def _with_statistics(name: str = "efficientnet-lite0", seed: int = 0) -> nn.Module:
    """A model whose batch norms hold statistics and affines far from a fresh layer's (where folding would change
    next to nothing)."""
    torch.manual_seed(seed)
    m = create_model(name, num_classes=5, in_channels=3, image_size=64)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18", "resnet50", "mobilenet-v3-small", "vgg16-bn"])
def test_batch_norm_folds_into_the_convolution_at_inference_only(name):
    """Every batch norm of the pretrained families follows its convolution and, in eval mode, is folded into its
    weight and bias (the batch norm modules pass their input through); the output and the gradients of the input, the
    first convolution's weight and a batch norm's γ and β are the two modules' (fp32, 1e-5; a frozen backbone
    under a training head, and gradual unfreezing, take gradients in eval mode). Training mode,
    `train.fused=false` (set_fusion) and unfolded_batch_norm run the two modules; the state dict is unchanged."""
    from cnnlab.explain import last_conv
    from cnnlab.models.fused import unfolded_batch_norm

    m = _with_statistics(name).eval()
    keys = list(m.state_dict())
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    calls = []
    for bn in bns:
        bn.register_forward_hook(lambda mod, inp, out: calls.append(out is not inp[0]))  # it computed
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    params = [convs[0].weight, bns[len(bns) // 2].weight, bns[len(bns) // 2].bias]
    x = torch.randn(3, 3, 64, 64, requires_grad=True)

    def run(model=m, x=x):
        calls.clear()
        ps = [dict(model.named_parameters())[k] for k in names]
        out = model(x)
        return [out, *torch.autograd.grad(out.square().sum(), [x, *ps])], sum(calls)

    names = [k for k, p in m.named_parameters() if any(p is q for q in params)]
    folded, n = run()
    assert n == 0
    double, xd = copy.deepcopy(m).double(), x.detach().double().requires_grad_()
    exact = run(double, xd)[0]
    with unfolded_batch_norm():
        plain, n = run()
        exact_plain = run(double, xd)[0]
    assert n == len(bns) > 10
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    # the same function: folded and unfolded agree in float64
    assert all(rel(a, b) < 1e-9 for a, b in zip(exact, exact_plain)), [rel(a, b) for a, b in zip(exact, exact_plain)]
    # and in float32 the output is within 1e-5 of float64's either way; the gradients within 1 % (a deep random
    # net's gradients cancel: float32's rounding moved VGG-16-BN's input gradient by 3e-3 folded and 7e-7
    # unfolded, ResNet-50's by 1e-6 folded and 5e-4 unfolded)
    assert rel(folded[0], exact[0]) < 1e-5 and rel(plain[0], exact_plain[0]) < 1e-5
    for a, b, e, ep in zip(folded[1:], plain[1:], exact[1:], exact_plain[1:]):
        assert rel(a, e) < 1e-2 and rel(b, ep) < 1e-2, (rel(a, e), rel(b, ep))
    set_fusion(m, False)
    assert run()[1] == len(bns)
    set_fusion(m, None)
    if name != "vgg16-bn":  # VGG's last convolution is followed by ReLU, not batch norm
        with unfolded_batch_norm(last_conv(m)):  # one convolution unfolded (Grad-CAM's), the others folded
            assert run()[1] == 1
    m.train()
    assert run()[1] == len(bns)
    assert list(m.state_dict()) == keys


def test_folded_batch_norm_under_bf16_autocast_stays_as_close_to_float32():
    """At inference under bf16 autocast (a CPU with native bf16) the folded network's features are within 1 % of
    the fp32 network's, as the unfolded bf16 network's are (measured: 0.25 % and 0.19 % at 224 px)."""
    from cnnlab.models.fused import unfolded_batch_norm

    m = _with_statistics(seed=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = m.backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded = m.backbone(x).float()
            with unfolded_batch_norm():
                plain = m.backbone(x).float()
    rel = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(folded) < 0.01 and rel(plain) < 0.01, (rel(folded), rel(plain))


def test_only_a_batch_norm_known_to_follow_its_convolution_is_folded():
    """fold_batch_norms pairs a convolution and a batch norm in a Sequential that runs in order, and torchvision's
    ResNet blocks' convN / bnN; another module's conv1 / bn1 (here a pre-activation block, bn1 before conv1) or a
    Sequential with its own forward is left as it is, and computes what it did."""
    from cnnlab.models.fused import FoldableBatchNorm2d, fold_batch_norms

    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv1(F.relu(self.bn1(x)))

    class Reversed(nn.Sequential):
        def forward(self, x):
            for m in reversed(self):
                x = m(x)
            return x

    torch.manual_seed(0)
    model = nn.Sequential(PreAct(), Reversed(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Conv2d(4, 6, 1),
                          nn.BatchNorm2d(6))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
        assert fold_batch_norms(model) == 1
        assert [type(m) is FoldableBatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == \
            [False, False, True]
        assert torch.allclose(model(x), before, atol=1e-5)
