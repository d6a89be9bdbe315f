"""cnnlab's native CPU kernels (models/native.py, native_kernels.c): built once per machine, checked against
torch's modules on the shapes that stress them (channel counts below, at and above a 16-lane chunk, odd
sizes, ties), and a machine without a C compiler falls back to the torch-op path and says so."""

from __future__ import annotations

import copy
import os
import platform
import stat

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.hardware import cpu_flags
from cnnlab.models import native, set_fusion
from cnnlab.models.fused import (ConvPoolStats, FusedSequential, _NativeConvMaxPoolReLU, _NativeConvReLU,
                                 _NativeConvReLUBatchNormMaxPool)
from cnnlab.training.runtime import Runtime


@pytest.fixture(autouse=True, scope="module")
def kernels():
    if native.library() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the native kernels must build on CI: {native.why_not()}")
        pytest.skip(f"no native kernels here: {native.why_not()}")
    # the stems' kernels are checked on every CPU, taken by default or not
    _NativeConvMaxPoolReLU.enabled = _NativeConvReLUBatchNormMaxPool.enabled = True
    yield
    _NativeConvMaxPoolReLU.enabled = _NativeConvReLUBatchNormMaxPool.enabled = None


def test_the_stem_kernels_are_taken_by_default_only_where_measured():
    """With AVX2 or AVX-512 the one-pass stem measured faster than torch's convolution + the native pool
    (stem_bench); elsewhere (older x86, ARM) it is not measured, so not taken."""
    assert native.stem_pays({"avx2", "fma", "avx512f", "avx512bw"}) is True
    assert native.stem_pays({"avx2", "fma"}) is True
    assert native.stem_pays({"sse4_2"}) is False and native.stem_pays({"asimd", "fp"}) is False
    # the one-pass forward: wherever the stem pays, except bf16 with AMX (oneDNN's tile kernels measured faster)
    amx = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert native.stem_forward_pays(torch.bfloat16, amx) is False
    assert native.stem_forward_pays(torch.float32, amx) is True
    assert native.stem_forward_pays(torch.bfloat16, {"avx2", "avx512f", "avx512_bf16"}) is True
    assert native.stem_forward_pays(torch.bfloat16, {"avx2"}) is True
    assert native.stem_forward_pays(torch.float32, {"sse4_2"}) is False
    conv = nn.Conv2d(3, 8, 3)
    x = torch.rand(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    seq = FusedSequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(2)).to(memory_format=torch.channels_last)
    _NativeConvMaxPoolReLU.enabled = None
    try:
        stem = type(seq(x).grad_fn).__name__ == "_NativeConvMaxPoolReLUBackward"
    finally:
        _NativeConvMaxPoolReLU.enabled = True
    assert stem == native.stem_pays()
    seq = FusedSequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(inplace=True), nn.BatchNorm2d(8), nn.MaxPool2d(2))
    seq = seq.to(memory_format=torch.channels_last)
    _NativeConvReLUBatchNormMaxPool.enabled = None
    try:
        stem = type(seq(torch.rand(2, 1, 12, 12)).grad_fn).__name__ == "_NativeConvReLUBatchNormMaxPoolBackward"
    finally:
        _NativeConvReLUBatchNormMaxPool.enabled = True
    assert stem == native.stem_pays()
    r = Runtime("cpu", precision="32")
    assert r.native_for(seq) is True
    reason = r.reasons["native"]
    assert reason.startswith("on:") and ("stem kernels off" in reason) == (not native.stem_pays())
    assert "AMX" not in reason  # fp32: the one-pass stem forward wherever the stem kernels run
    r = Runtime("cpu", precision="bf16-mixed")
    assert r.native_for(seq) is True
    amx_says = "stem forward through torch's convolution (oneDNN's AMX kernels" in r.reasons["native"]
    assert amx_says == (native.stem_pays() and not native.stem_forward_pays(torch.bfloat16))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A fresh kernel cache and a forgotten library; the real one is loaded again afterwards."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    native.reset()
    yield tmp_path
    monkeypatch.undo()
    native.reset()
    assert native.library() is not None


# native_kernels.c has a code path per x86 CPU kind: AVX2 (8 lanes, narrowing by packs, 6 taps and 6 channels in
# registers), AVX-512 (16 lanes, 13 taps, 12 channels; bf16 rounded in software) and AVX-512 BF16 (its conversion
# and dot-product instructions). `-march=native` builds only this CPU's, so the correctness tests below also run on
# each build for a smaller kind that this CPU can execute: an AVX-512 BF16 machine checks the AVX2 path and the
# AVX-512 path of CPUs without BF16 (Intel's Skylake / Cascade Lake servers), which no machine of ours has.
X86_64_V3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}  # the flags -march=x86-64-v3 code needs
BUILDS = {
    "avx2": ("x86-64-v3", X86_64_V3),
    "avx512-no-bf16": ("skylake-avx512", X86_64_V3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
}


@pytest.fixture(params=["native", *BUILDS])
def build(request):
    """The kernels built with -march=native, or for the CPU kind named (skipped where this CPU cannot run it);
    the native build is loaded again afterwards."""
    if request.param == "native":
        yield native.FLAGS
        return
    march, needs = BUILDS[request.param]
    if platform.machine() not in ("x86_64", "AMD64") or not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run code built for {request.param} (-march={march})")
    flags, own = native.FLAGS, native.library()._name
    native.FLAGS = [f"-march={march}" if f.startswith("-march=") else f for f in flags]
    native.reset()
    try:
        assert native.library() is not None, native.why_not()
        assert native.library()._name != own  # a build of its own, not the native one again
        yield native.FLAGS
    finally:
        native.FLAGS = flags
        native.reset()
        assert native.library() is not None


every_build = pytest.mark.usefixtures("build")


SHAPES = [(4, 32, 28, 28), (3, 10, 9, 7), (2, 1, 6, 6), (2, 20, 8, 10), (2, 37, 5, 4)]  # C < 16, = 2×16, > 16…


def _grid(shape, dtype, seed=0):
    """Values on a coarse grid: ties inside pooling windows, zeros and all-negative windows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 7, shape, generator=g).float() / 4).contiguous(memory_format=torch.channels_last).to(dtype)


@every_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_maxpool_is_torchs_bit_for_bit(shape, dtype):
    x = _grid(shape, dtype)
    g = _grid((shape[0], shape[1], shape[2] // 2, shape[3] // 2), dtype, seed=1)
    outs = {}
    for use_native in (True, False):
        xi = x.clone().requires_grad_()
        seq = FusedSequential(nn.ReLU(inplace=True), nn.MaxPool2d(2))
        set_fusion(seq, None, use_native)
        out = seq(xi * 1)
        assert ("Native" in type(out.grad_fn).__name__) == use_native
        out.backward(g)
        outs[use_native] = (out, xi.grad)
    assert outs[True][0].dtype == dtype and outs[True][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1])  # ties: the first max in torch's scan order gets it


def _bn_block(c: int) -> FusedSequential:
    torch.manual_seed(c)
    seq = FusedSequential(nn.ReLU(inplace=True), nn.BatchNorm2d(c), nn.MaxPool2d(2))
    with torch.no_grad():
        seq[1].weight.uniform_(0.5, 1.5)
        seq[1].bias.uniform_(-0.5, 0.5)
    return seq


def _run(seq, x, g, dtype, fuse, use_native):
    seq = copy.deepcopy(seq)
    set_fusion(seq, fuse, use_native)
    xi = x.detach().to(dtype, copy=True).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = seq(xi * 1)
    out.backward(g.to(out.dtype))
    return out, xi.grad, seq[1].weight.grad, seq[1].bias.grad, seq[1].running_var


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@every_build
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_batchnorm_maxpool_float32_matches_the_modules(shape):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    seq = _bn_block(shape[1])
    ref, got = _run(seq, x, g, torch.float32, False, False), _run(seq, x, g, torch.float32, True, True)
    assert "Native" in type(got[0].grad_fn).__name__
    for name, a, b in zip(("output", "input grad", "γ grad", "β grad", "running var"), got, ref):
        assert _rel(a, b) < 1e-5, name


@every_build
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_batchnorm_maxpool_bf16_is_closer_to_float32_than_torchs_bf16(shape):
    """Under bf16 autocast the native block computes its statistics, affine and gradients in float from the
    bf16 activation, rounding once at the end; torch's bf16 modules round after each module, and its max-pool
    then picks among ties the rounding made. Both against the float32 modules on the same bf16 input."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).bfloat16().float()
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).bfloat16().float()
    seq = _bn_block(shape[1])
    exact = _run(seq, x, g, torch.float32, False, False)
    torch_bf16 = _run(seq, x, g, torch.bfloat16, False, False)
    native_bf16 = _run(seq, x, g, torch.bfloat16, True, True)
    assert native_bf16[0].dtype == torch.bfloat16 and "Native" in type(native_bf16[0].grad_fn).__name__
    for i, name in enumerate(("output", "input grad", "γ grad", "β grad")):
        ours, theirs = _rel(native_bf16[i], exact[i]), _rel(torch_bf16[i], exact[i])
        assert ours < 0.01, name
        assert ours <= 1.5 * theirs + 1e-3, (name, ours, theirs)


@every_build
def test_odd_sizes_count_in_the_statistics_and_get_no_pooled_gradient():
    x = torch.randn(2, 5, 7, 9).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 5, 3, 4)
    got = _run(_bn_block(5), x, g, torch.float32, True, True)
    ref = _run(_bn_block(5), x, g, torch.float32, False, False)
    assert _rel(got[4], ref[4]) < 1e-6  # the last row and column are in batch norm's statistics
    assert _rel(got[1], ref[1]) < 1e-5  # and their gradient is batch norm's alone


def test_the_kernels_are_built_once_and_kept(elsewhere, capsys):
    assert native.library() is not None
    assert "cnnlab: compiling the native CPU kernels for this CPU" in capsys.readouterr().err  # the wait is said
    built = list((elsewhere / "cache" / "native").glob("cnnlab_kernels-*.so"))
    assert len(built) == 1
    before = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None
    assert "compiling" not in capsys.readouterr().err
    assert list((elsewhere / "cache" / "native").glob("*")) == built and built[0].stat().st_mtime_ns == before
    r = Runtime("cpu")
    assert r.native_for(_bn_block(4)) is True and r.reasons["native"].startswith("on: compiled for this CPU with ")


def test_only_a_model_with_fused_blocks_waits_for_the_compile(elsewhere, capsys):
    """A backbone (no fused blocks), a torch.compile'd run and a papers' net evaluated: nothing compiled."""
    cache = elsewhere / "cache" / "native"
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    r = Runtime("cpu")
    assert r.native is None  # open until the model is known
    assert r.native_for(backbone) is False and r.describe()["native"] is False
    assert r.describe()["defaults_because"]["native"] == "off: the model has no fused conv blocks (not compiled)"
    r = Runtime("cpu")
    assert r.native_for(_bn_block(4), fused=False) is False and "train.compile" in r.reasons["native"]
    seq = _bn_block(4).eval()
    with torch.no_grad():
        seq(torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last))
    assert not cache.exists() or not list(cache.glob("*.so"))
    assert "compiling" not in capsys.readouterr().err
    r = Runtime("cpu")
    assert r.native_for(_bn_block(4)) is True and r.native_for(backbone) is True  # decided once per runtime
    assert len(list(cache.glob("*.so"))) == 1


def test_without_a_compiler_the_torch_path_runs_and_env_says_why(elsewhere, monkeypatch):
    monkeypatch.setenv("CC", str(elsewhere / "no-such-cc"))
    assert native.library() is None and "no C compiler" in native.why_not()
    r = Runtime("cpu")
    assert r.fused is True and r.native_for(_bn_block(4)) is False
    assert r.describe()["defaults_because"]["native"].startswith("off: no C compiler")
    with pytest.raises(RuntimeError, match="train.native=true but the native kernels cannot be built here"):
        Runtime("cpu", native=True)
    with pytest.raises(RuntimeError, match="train.native=true but the native kernels cannot be built here"):
        Runtime("cpu", fused=False, native=True).native_warp()  # the blocks off, the warp still asked for
    assert r.native_warp() is False  # augmented batches: torch's warp, and env.json says why
    assert r.describe()["defaults_because"]["augment"].startswith("flip and warp through torch's ops: no C compiler")
    seq = _bn_block(4)
    out = seq(torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last))
    assert type(out.grad_fn).__name__ == "_ReLUBatchNormMaxPoolBackward"  # the fused torch-op path


def test_native_true_on_cuda_is_refused_fused_or_not(monkeypatch):
    # the kernels are CPU kernels: asked for on CUDA, an error whether they would serve the blocks or the warp
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before anything touches CUDA
    for fused in (None, True, False):
        with pytest.raises(RuntimeError, match="train.native=true: the native kernels are CPU kernels"):
            Runtime("cuda", fused=fused, native=True)


def test_a_failing_compiler_is_reported_with_its_message(elsewhere, monkeypatch):
    cc = elsewhere / "broken-cc"
    cc.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "broken-cc 1.0"; exit 0; fi\n'
                  'echo "broken-cc: cannot compile today" >&2; exit 1\n')
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(cc))
    assert native.library() is None
    assert "broken-cc failed: broken-cc: cannot compile today" in native.why_not()
    assert not list((elsewhere / "cache" / "native").glob("*"))  # nothing half-written left behind


def test_switches_reach_the_model_and_env(tmp_path):
    from conftest import fit_run

    tiny = {"data.max_per_class": 40, "data.batch_size": 64, "train.epochs": 1, "train.seed": 0,
            "model.name": "harahap-cnn"}
    on = fit_run(tiny, out=tmp_path / "on")
    off = fit_run(dict(tiny, **{"train.native": False}), out=tmp_path / "off")
    unfused = fit_run(dict(tiny, **{"train.fused": False}), out=tmp_path / "unfused")
    assert on.env["native"] is True and on.env["defaults_because"]["native"].startswith("on:")
    assert off.env["native"] is False and "native" not in off.env["defaults_because"]
    assert unfused.env["native"] is False
    assert unfused.env["defaults_because"]["native"] == "off with the fused blocks (train.fused=false)"
    from cnnlab.config import load_config
    from cnnlab.experiment import build_experiment
    from cnnlab.training.progress import ProgressLogger

    for overrides, want in ((tiny, None), (dict(tiny, **{"train.native": False}), False)):
        built = build_experiment(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), ProgressLogger("none"))
        assert built.model.backbone.native is (want if want is False else True)


@every_build
def test_a_training_step_under_bf16_reaches_the_same_loss_as_float32():
    """The first paper's net on the built-in silhouettes: ten steps of Adam in bf16-mixed through the native
    kernels end at the loss the float32 modules reach, within bf16's rounding."""
    from cnnlab.data import load_source
    from cnnlab.models import create_model

    ds = load_source("animal-shapes", max_per_class=26)
    x = ((torch.as_tensor(ds.images[:256]).float() / 255 - 0.2) / 0.4).contiguous(memory_format=torch.channels_last)
    y = torch.as_tensor(ds.labels[:256])
    torch.manual_seed(0)
    m0 = create_model("harahap-cnn", num_classes=10, in_channels=1, image_size=28, dropout=0.0)
    m0 = m0.to(memory_format=torch.channels_last)
    losses = {}
    for name, (fuse, use_native, bf16) in {"fp32 modules": (False, False, False),
                                           "bf16 native": (True, True, True)}.items():
        m = copy.deepcopy(m0)
        set_fusion(m, fuse, use_native)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for _ in range(10):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(m(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    # bf16 moves a near-memorised loss (~0.12) by a few hundredths of itself: on a Zen 3 (AVX2, bf16 emulated)
    # torch's own bf16 modules ended 2 % above float32 and the native kernels 3.2 % (0.128 against 0.124)
    assert losses["bf16 native"] == pytest.approx(losses["fp32 modules"], rel=0.03, abs=0.01)
    assert losses["fp32 modules"] < 1.5  # it learned: ln 10 = 2.30 at the start


STEMS = [  # (batch, input channels, height, width, output channels, kernel): KW·Ci up to 16, KH up to 8
    (1, 3, 9, 9, 10, 3), (2, 1, 12, 11, 32, 5), (3, 4, 10, 13, 5, 4), (2, 2, 15, 12, 17, 8), (4, 3, 16, 16, 20, 5)]


@every_build
@pytest.mark.parametrize("shape", STEMS)
def test_stem_weight_gradient_from_the_pooled_one_is_the_modules(shape):
    """conv → ReLU → max-pool with an input that needs no gradient: the weights' and bias's gradients from
    conv_pool_wgrad equal the modules' (float32, 1e-5), batch 1 (the last image is read from a padded copy),
    odd sizes (the dropped row and column get nothing) and ties (a coarse grid) included."""
    n, ci, h, w, c, k = shape
    torch.manual_seed(0)
    seq = FusedSequential(nn.Conv2d(ci, c, k), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    seq = seq.to(memory_format=torch.channels_last)
    x = _grid((n, ci, h, w), torch.float32)
    g = _grid((n, c, (h - k + 1) // 2, (w - k + 1) // 2), torch.float32, seed=1)
    got = {}
    for use_native in (True, False):
        s = copy.deepcopy(seq)
        set_fusion(s, None, use_native)
        out = s(x)
        assert (type(out.grad_fn).__name__ == "_NativeConvMaxPoolReLUBackward") == use_native
        out.backward(g)
        got[use_native] = (out, s[0].weight.grad, s[0].bias.grad)
    assert _rel(got[True][0], got[False][0]) < 1e-6  # the native forward sums the convolution in its own order
    assert _rel(got[True][1], got[False][1]) < 1e-5 and _rel(got[True][2], got[False][2]) < 1e-5
    s = copy.deepcopy(seq)  # the benchmark's switch: torch's convolution forward, then the native pool
    _NativeConvMaxPoolReLU.native_forward = False
    try:
        out = s(x)
    finally:
        _NativeConvMaxPoolReLU.native_forward = None
    assert type(out.grad_fn).__name__ == "_NativeConvMaxPoolReLUBackward"
    assert torch.equal(out, got[False][0])


@pytest.mark.parametrize("one_pass", [True, False])
def test_the_stem_forward_follows_the_cpus_decision(monkeypatch, one_pass):
    """With native_forward unset the stem's forward is the one native pass exactly where
    native.stem_forward_pays says so for the dtype it computes in, else torch's convolution and the native pool;
    the backward is the native one either way, and both forwards give the same values (fp32 to 1e-6)."""
    seq = FusedSequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    seq = seq.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 14, 14).contiguous(memory_format=torch.channels_last)
    asked, calls = [], []
    real = native.conv_pool_forward
    monkeypatch.setattr(native, "stem_forward_pays", lambda dtype, flags=None: asked.append(dtype) or one_pass)
    monkeypatch.setattr(native, "conv_pool_forward", lambda *a: calls.append(a) or real(*a))
    assert _NativeConvMaxPoolReLU.native_forward is None
    out = seq(x)
    assert asked == [torch.float32] and len(calls) == int(one_pass)
    assert type(out.grad_fn).__name__ == "_NativeConvMaxPoolReLUBackward"
    with torch.no_grad():
        ref = F.max_pool2d(seq[0](x), 2).relu_()
    assert _rel(out.detach(), ref) < 1e-6
    out.sum().backward()
    assert seq[0].weight.grad is not None


def _conv_pool_reference(x, conv, dtype):
    """torch's convolution (under autocast for bf16, as training runs it), then the native pool."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = F.conv2d(x, conv.weight, conv.bias)
    pooled, idx, _ = native.pool_stats(y.contiguous(memory_format=torch.channels_last), relu=True, stats=False)
    return pooled, idx


@every_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", STEMS + [(2, 3, 21, 40, 13, 3), (1, 1, 34, 35, 1, 2), (2, 3, 18, 19, 26, 3),
                                   (1, 2, 12, 37, 33, 3), (1, 3, 10, 11, 40, 3)])
def test_stem_forward_without_the_convolution_output_is_torchs(shape, dtype):
    """conv_pool_forward against torch's convolution + pool_stats: float32 to 1e-6 (its own summing order); bf16
    the same values but where a sum lies on a rounding boundary (then one bf16 step apart, rarely); the same
    window positions wherever the pooled value is > 0 and the two agree. Channel counts in one register chunk and
    in several (13, 17, 20, 26 channels), odd sizes and widths that leave part of a 16-column chunk, batch 1, KH
    up to 8; an image on a coarse grid, so windows hold ties."""
    n, ci, h, w, c, k = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(ci, c, k)
    x = _grid((n, ci, h, w), torch.float32)
    ours, ours_idx = native.conv_pool_forward(x, conv.weight, conv.bias, dtype)
    theirs, theirs_idx = _conv_pool_reference(x, conv, dtype)
    plain = native.conv_pool_forward(x.contiguous(), conv.weight, conv.bias, dtype)  # NCHW x: the same, bit for bit
    assert torch.equal(plain[0], ours) and torch.equal(plain[1], ours_idx)
    assert ours.dtype == dtype and ours.shape == theirs.shape and ours.is_contiguous(memory_format=torch.channels_last)
    same = ours == theirs
    if dtype == torch.float32:
        assert _rel(ours, theirs) < 1e-6
    else:
        step = theirs.float().abs() * 2 ** -7 + 1e-30  # one bf16 step at that magnitude (or less)
        assert bool(((ours.float() - theirs.float()).abs() <= step).all())
        assert same.float().mean() > 0.99
    assert torch.equal(ours_idx[same & (theirs > 0)], theirs_idx[same & (theirs > 0)])


@every_build
def test_stem_forward_keeps_nan_and_relu():
    """A NaN pixel makes NaN of every pooled value whose window's convolution reads it (as torch's); windows whose
    convolution is all negative give 0."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.fill_(-1.0)
        conv.bias.zero_()
    x = torch.ones(1, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    x[0, 1, 5, 5] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        ours, _ = native.conv_pool_forward(x, conv.weight, conv.bias, dtype)
        theirs, _ = _conv_pool_reference(x, conv, dtype)
        assert torch.equal(ours.isnan(), theirs.isnan()) and int(ours.isnan().sum()) > 0
        assert bool((ours[~ours.isnan()] == 0).all())


@pytest.mark.parametrize("case", ["input needs its gradient", "padded", "stride 2", "KW·Ci > 16", "fp16 autocast",
                                  "bias only frozen"])
def test_stem_path_only_where_it_computes_the_same(case):
    conv = nn.Conv2d(3, 8, 3)
    x = _grid((2, 3, 12, 12), torch.float32)
    if case == "input needs its gradient":
        x.requires_grad_()
    elif case == "padded":
        conv = nn.Conv2d(3, 8, 3, padding=1)
    elif case == "stride 2":
        conv = nn.Conv2d(3, 8, 3, stride=2)
    elif case == "KW·Ci > 16":
        conv, x = nn.Conv2d(4, 8, 5), _grid((2, 4, 12, 12), torch.float32)
    elif case == "bias only frozen":
        conv.bias.requires_grad_(False)  # the weights still train: the path applies, without a bias gradient
    seq = FusedSequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(2)).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.float16, enabled=case == "fp16 autocast"):  # no fp16 kernels
        out = seq(x)
    stem = type(out.grad_fn).__name__ == "_NativeConvMaxPoolReLUBackward"
    assert stem == (case == "bias only frozen")
    out.sum().backward()
    assert conv.weight.grad is not None and (conv.bias.grad is None) == (case == "bias only frozen")


CONV_BLOCKS = [  # (batch, input channels, height, width, output channels, kernel, padding)
    (4, 1, 28, 28, 32, 5, 2),        # the first paper's net: 32 channels, whole vectors
    (2, 3, 9, 11, 10, 3, 0),         # channels short of a vector, odd sizes (a dropped row and column)
    (3, 2, 12, 13, 20, 5, "same"),
    (1, 3, 8, 7, 17, 3, (1, 0)),     # batch 1, padding on one axis
    (2, 4, 10, 12, 40, 4, (2, 1)),   # an even kernel, more taps than the registers hold at once
]


def _conv_block(ci: int, c: int, k: int, padding, bias: bool = True) -> FusedSequential:
    torch.manual_seed(c)
    seq = FusedSequential(nn.Conv2d(ci, c, k, padding=padding, bias=bias), nn.ReLU(inplace=True),
                          nn.BatchNorm2d(c), nn.MaxPool2d(2))
    with torch.no_grad():
        seq[2].weight.uniform_(0.5, 1.5)
        seq[2].bias.uniform_(-0.5, 0.5)
    return seq.to(memory_format=torch.channels_last)


def _conv_run(seq, x, g, native_on: bool, bf16: bool = False, steps: int = 2):
    """`steps` forward + backward passes (running statistics accumulate); the last output and every gradient."""
    seq = copy.deepcopy(seq)
    set_fusion(seq, native_on or None, native_on)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = seq(x)
        out.float().backward(g)
    grads = [p.grad for p in seq.parameters()]
    return out, type(out.grad_fn).__name__, grads, seq[2].running_mean, seq[2].running_var


@every_build
@pytest.mark.parametrize("shape", CONV_BLOCKS)
def test_first_conv_block_weight_gradient_without_the_full_sized_one_is_the_modules(shape):
    """conv → ReLU → batch norm → max-pool on an image batch (the first paper's net): the block's gradient,
    multiplied into the convolution's weight gradient row by row (pool_backward_wgrad), gives the modules'
    gradients for the convolution's weights and bias and batch norm's γ and β, and the same output and running
    statistics, within 1e-5 of the modules run in float64 and at least as close to them as the float32 modules
    (the convolution's bias gradient, a sum that mostly cancels, was 1e-6 from float64 here and 1e-5 through
    the float32 modules) — padding on both axes, one or "same", channel counts in and short of whole vectors,
    an even kernel, batch 1, odd sizes."""
    n, ci, h, w, c, k, padding = shape
    seq = _conv_block(ci, c, k, padding)
    x = torch.randn(n, ci, h, w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        g = torch.randn(seq(x).shape)
    ours, theirs = _conv_run(seq, x, g, True), _conv_run(seq, x, g, False)
    exact = _conv_run(copy.deepcopy(seq).double(), x.double(), g.double(), False)
    assert ours[1] == "_NativeConvReLUBatchNormMaxPoolBackward" and "Native" not in theirs[1]
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    pairs = [("output", ours[0], theirs[0], exact[0]), ("running mean", ours[3], theirs[3], exact[3]),
             ("running var", ours[4], theirs[4], exact[4])]
    pairs += [(name, *t) for name, *t in zip(("conv weight", "conv bias", "γ", "β"), ours[2], theirs[2], exact[2])]
    for name, a, b, e in pairs:
        assert _rel(a, e) < 1e-5 and _rel(a, e) <= 2 * _rel(b, e) + 1e-7, (name, _rel(a, e), _rel(b, e))


@every_build
def test_first_conv_block_under_bf16_autocast_is_as_close_to_float32_as_torchs_bf16():
    """Under bf16 autocast torch's convolution gives a bf16 output; the block's statistics, gradient and the
    weight gradient's sums are float from there. The output and batch norm's gradients stay within 1 % of the
    float32 modules; the convolution's gradients, sums that mostly cancel, move by several percent with bf16's
    rounding of the convolution output (6–9 % here, through torch's bf16 modules as through ours): ours are no
    further from float32 than torch's bf16 modules (which also round the full-sized gradient to bf16)."""
    seq = _conv_block(1, 32, 5, 2)
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 32, 14, 14)
    exact = _conv_run(seq, x, g, False, steps=1)
    ours, theirs = _conv_run(seq, x, g, True, bf16=True, steps=1), _conv_run(seq, x, g, False, bf16=True, steps=1)
    assert ours[0].dtype == torch.bfloat16 and ours[1] == "_NativeConvReLUBatchNormMaxPoolBackward"
    assert _rel(ours[0], exact[0]) < 0.01
    for name, a, b, t in zip(("conv weight", "conv bias", "γ", "β"), ours[2], exact[2], theirs[2]):
        assert a.dtype == torch.float32, name
        assert _rel(a, b) < (0.01 if name in ("γ", "β") else 0.15), name
        assert _rel(a, b) <= 1.1 * _rel(t, b) + 1e-3, (name, _rel(a, b), _rel(t, b))


@pytest.mark.parametrize("shape", CONV_BLOCKS)
def test_first_conv_block_weight_gradient_in_bf16_dot_products_is_exact_on_the_rounded_values(shape):
    """pool_backward_wgrad's bf16 dot products (dot=True; the default in bf16 where wgrad_dot_pays) round dy and
    the input to bf16 as torch's bf16 convolution backward does, and sum their exact products in float32: the
    weight gradient is within 1e-5 of float64's over the same rounded values (pool_backward's bf16 dy, the bf16
    input) — pairs of columns across odd widths, channels short of a vector, an even kernel, batch 1 — and the
    bias's, summed from the unrounded rows, is the float32 path's."""
    need_bf16_kernel(native.wgrad_dot_available(), "pool_backward_wgrad's dot products")
    n, ci, h, w, c, k, padding = shape
    seq = _conv_block(ci, c, k, padding)
    conv = seq[0]
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    if padding == "same":  # an odd kernel's "same": k // 2 on each side
        ph = pw = k // 2
    x = torch.randn(n, ci, h, w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = F.conv2d(x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), padding=(ph, pw))
    y = y.contiguous(memory_format=torch.channels_last)
    pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
    g = torch.randn(pooled.shape).bfloat16().contiguous(memory_format=torch.channels_last)
    a, kk, b = torch.rand(c) + 0.5, torch.randn(c) * 0.1, torch.randn(c) * 0.1
    xp = F.pad(x, (pw, pw, ph, ph))
    dw, db = native.pool_backward_wgrad(y, idx, g, a, kk, b, xp, (k, k), dot=True)
    dw32, db32 = native.pool_backward_wgrad(y, idx, g, a, kk, b, xp, (k, k), dot=False)
    dy = native.pool_backward(y, idx, g, a, kk, b)  # bf16: rounded as the dot products round it
    exact = torch.ops.aten.convolution_backward(dy.double(), x.bfloat16().double(), conv.weight.double(), [c],
                                                [1, 1], [ph, pw], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    assert dw.dtype == torch.float32 and dw.shape == conv.weight.shape
    assert _rel(dw, exact) < 1e-5, _rel(dw, exact)
    assert torch.equal(db, db32) and _rel(dw, dw32) < 0.02  # float32's: dy and x unrounded
    default = native.pool_backward_wgrad(y, idx, g, a, kk, b, xp, (k, k))
    assert torch.equal(default[0], dw if native.wgrad_dot_pays() else dw32)


def decided_by_bf16_without_amx(pays, available, reason: str) -> None:
    """A bf16 dot-product kernel's default: on with AVX-512 BF16 and no AMX, off with AMX or without BF16; built
    only where the CPU has AVX-512 BF16; said in a bf16 run's env.json reason (`reason`) exactly where it is on."""
    assert pays({"avx2", "avx512f", "avx512_bf16"}) is True
    assert pays({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) is False
    assert pays({"avx2", "avx512f", "avx512bw"}) is False
    assert available() <= ("avx512_bf16" in cpu_flags())
    r = Runtime("cpu", precision="bf16-mixed")
    assert r.native_for(FusedSequential(nn.Conv2d(1, 8, 3), nn.ReLU(inplace=True))) is True
    assert (reason in r.reasons["native"]) == (native.stem_pays() and pays() and available())


def test_the_weight_gradients_dot_products_are_taken_by_default_only_where_measured():
    """AVX-512 BF16 without AMX, for a bf16 block (measured faster there: conv_block_bench); never for float32,
    where the float32 FMAs keep the unrounded values; asked for where they are not built, a clear error."""
    decided_by_bf16_without_amx(native.wgrad_dot_pays, native.wgrad_dot_available,
                                "weight gradient before ReLU → batch norm → max-pool")
    if not native.wgrad_dot_available():
        y = torch.zeros(1, 16, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
        with pytest.raises(ValueError, match="AVX-512 BF16"):
            native.pool_backward_wgrad(y, idx, pooled, torch.ones(16), torch.ones(16), torch.ones(16),
                                       torch.zeros(1, 1, 6, 6), (3, 3), dot=True)


def test_first_conv_block_weight_gradient_is_laid_out_as_the_weight():
    """A channels-last model's 1-input-channel weight has strides (25, 1, 5, 1); the one-pass backward's weight
    gradient comes back with the same strides, as autograd's layout contract wants (DDP warned "grad strides do
    not match bucket view strides" on two processes before)."""
    seq = _conv_block(1, 32, 5, 2)
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    out = seq(x)
    assert type(out.grad_fn).__name__ == "_NativeConvReLUBatchNormMaxPoolBackward"
    out.float().sum().backward()
    for name, p in seq.named_parameters():
        assert p.grad.stride() == p.stride(), name


def need_bf16_kernel(available: bool, what: str) -> None:
    """Skip a test of a kernel built only for CPUs with AVX-512 BF16 where it is not built — except on CI with
    such a CPU, where it must be (a failure: the compiler dropped it)."""
    if available:
        return
    if "avx512_bf16" in cpu_flags():
        if os.environ.get("CI") == "true":
            pytest.fail(f"AVX-512 BF16 here, but the library built by {native.compiler_name()} has no {what}")
        pytest.skip(f"AVX-512 BF16 here, but {native.compiler_name()} did not build {what}")
    pytest.skip(f"{what} is built only for CPUs with AVX-512 BF16")


@pytest.fixture
def one_pass():
    """The first block's one-pass bf16 forward (conv_pool_stats): built wherever the CPU has AVX-512 BF16."""
    need_bf16_kernel(native.conv_pool_stats_available(), "conv_pool_stats")
    yield
    ConvPoolStats.enabled = None


ONE_PASS = [  # (batch, height, width, output channels, kernel, padding): the output's height even, width 4k
    (4, 28, 28, 32, (5, 5), (2, 2)),   # the first paper's net
    (3, 8, 12, 16, (3, 3), (1, 1)),    # 16 channels: one vector
    (2, 9, 11, 32, (4, 4), (1, 2)),    # an even kernel, odd input sizes, padding differing by axis
    (1, 6, 6, 32, (3, 3), (0, 0)),     # batch 1, no padding, one block a row
    (5, 10, 14, 32, (1, 1), (1, 1)),   # a 1×1 kernel: one kernel row, its pair's top half zero
    (2, 10, 12, 16, (3, 5), (1, 2)),   # a kernel taller than wide… (an odd height: its last row alone)
    (2, 9, 14, 32, (6, 3), (3, 0)),    # …and one wider than tall
]


@pytest.mark.parametrize("shape", ONE_PASS)
def test_first_conv_block_forward_in_one_pass_is_the_bf16_convolution_and_pool_stats(one_pass, shape):
    """conv_pool_stats rounds x, the weights and the bias to bf16 as autocast does and sums their exact products in
    float32: y is as close to float64's convolution of the rounded values as torch's bf16 convolution (≤ 1 bf16 step
    from it where their sums' order rounds differently), and pooled, idx and the sums are pool_stats' of that y, bit
    for bit — the same rows summed in the same order."""
    n, h, w, c, (kh, kw), padding = shape
    torch.manual_seed(n * h * w + c + kh + kw)
    x, cw, cb = torch.randn(n, 1, h, w), torch.randn(c, 1, kh, kw) * 0.3, torch.randn(c) * 0.1
    assert native.conv_pool_stats_applies(x, cw, padding)
    y, pooled, idx, sums = native.conv_pool_stats(x, cw, cb, padding)
    xb, wb, bb = x.bfloat16().double(), cw.bfloat16().double(), cb.bfloat16().double()
    theirs = F.conv2d(x.bfloat16(), cw.bfloat16(), cb.bfloat16(), padding=padding)
    exact = F.conv2d(xb, wb, bb, padding=padding)
    assert y.dtype == torch.bfloat16 and y.shape == theirs.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, exact) <= 1.01 * _rel(theirs, exact) + 1e-6, (_rel(y, exact), _rel(theirs, exact))
    # each value one bf16 rounding of a float32 sum: within half a bf16 step of float64's, plus float32's error,
    # which a sum that cancels can make larger than the result itself (bounded by the sum of the terms' sizes)
    terms = F.conv2d(xb.abs(), wb.abs(), bb.abs(), padding=padding)
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + terms * 2 ** -20).all()
    p0, i0, s0 = native.pool_stats(y, relu=True, stats=True)
    assert torch.equal(pooled, p0) and torch.equal(idx, i0) and torch.equal(sums, s0)
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    if kh % 2 and kw < 4:  # the kernel refuses other shapes itself, whatever its caller checked (here: Wc − 1)
        z = torch.zeros(64, dtype=torch.int64)
        with pytest.raises(ValueError, match="does not compute these shapes"):
            native._kernel("conv_pool_stats", torch.bfloat16)(x.data_ptr(), n, h, w - 1, cw.data_ptr(), None, c,
                                                              kh, kw, *padding, *[z.data_ptr()] * 4, 2)


def test_first_conv_block_one_pass_keeps_nan_and_relu(one_pass):
    """A NaN pixel gives NaN outputs at the 3×3 positions the kernel reaches from it, and no others (torch's bf16
    convolution here also spreads it one column further, where a zero weight meets it: 0·NaN); those win their
    windows (pool_stats' rule: a NaN is the max), pooled as the same bits pool_stats writes (0x7FC0), their channels'
    sums NaN; negative outputs pool as ReLU's zeros."""
    x, cw = torch.randn(2, 1, 8, 8), torch.randn(32, 1, 3, 3)
    x[1, 0, 4, 5] = float("nan")
    y, pooled, idx, sums = native.conv_pool_stats(x, cw, None, (1, 1))
    reached = torch.zeros(2, 32, 8, 8, dtype=torch.bool)
    reached[1, :, 3:6, 4:7] = True
    assert torch.equal(y.isnan(), reached)
    p0, i0, s0 = native.pool_stats(y, relu=True, stats=True)
    assert torch.equal(pooled.view(torch.int16), p0.view(torch.int16)) and torch.equal(idx, i0)
    assert sums.isnan().all() and pooled[1].isnan().any() and (pooled[0] >= 0).all()


@pytest.mark.parametrize("on,bias", [(True, True), (False, True), (True, False)])
def test_first_conv_block_under_bf16_takes_the_one_pass_forward_as_asked(one_pass, monkeypatch, on, bias):
    """The block under bf16 autocast forms its forward in one pass where ConvPoolStats allows it (by default where
    conv_pool_stats_pays), and trains to the same output, running statistics and gradients as through torch's bf16
    convolution + pool_stats (they differ only where y's last bf16 bit does: 1e-3 of the output and batch norm's,
    a few times that for the convolution's gradients, sums that mostly cancel)."""
    seq = _conv_block(1, 32, 5, 2, bias=bias)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 32, 14, 14)
    calls = []
    real = native.conv_pool_stats
    monkeypatch.setattr(native, "conv_pool_stats", lambda *a: calls.append(1) or real(*a))
    ConvPoolStats.enabled = on
    ours = _conv_run(seq, x, g, True, bf16=True)
    assert len(calls) == (2 if on else 0) and ours[1] == "_NativeConvReLUBatchNormMaxPoolBackward"
    ConvPoolStats.enabled = not on
    other = _conv_run(seq, x, g, True, bf16=True)
    assert len(calls) == 2
    for name, a, b in [("output", ours[0], other[0]), ("running mean", ours[3], other[3]),
                       ("running var", ours[4], other[4])] + list(zip(("conv weight", "conv bias", "γ", "β"),
                                                                     ours[2], other[2])):
        assert (a is None) == (b is None), name
        if a is not None:
            assert _rel(a, b) < (1e-2 if name.startswith("conv") else 2e-3), (name, _rel(a, b))
    ConvPoolStats.enabled = None
    calls.clear()
    _conv_run(seq, x, g, True, bf16=True, steps=1)
    assert len(calls) == int(native.conv_pool_stats_pays())
    _conv_run(seq, x, g, True, bf16=False, steps=1)  # float32: torch's convolution
    _conv_run(_conv_block(1, 32, 5, 2), torch.randn(2, 1, 27, 28).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 32, 13, 14), True, bf16=True, steps=1)  # an odd height: torch's convolution
    assert len(calls) == int(native.conv_pool_stats_pays())


def test_the_one_pass_forward_is_taken_by_default_only_where_measured():
    """AVX-512 BF16 without AMX (measured faster there: conv_block_bench), said in env.json's reason; only for the
    shapes it computes; asked for where it is not built or does not apply, a clear error."""
    decided_by_bf16_without_amx(native.conv_pool_stats_pays, native.conv_pool_stats_available,
                                "in one bf16 dot-product pass")
    x, w = torch.zeros(2, 1, 8, 8), torch.zeros(32, 1, 3, 3)
    if not native.conv_pool_stats_available():
        with pytest.raises(ValueError, match="AVX-512 BF16"):
            native.conv_pool_stats(x, w, None, (1, 1))
        return
    for xs, ws, pad in [((2, 3, 8, 8), (32, 3, 3, 3), (1, 1)), ((2, 1, 8, 8), (64, 1, 3, 3), (1, 1)),
                        ((2, 1, 9, 8), (32, 1, 3, 3), (1, 1)), ((2, 1, 8, 6), (32, 1, 3, 3), (1, 1))]:
        assert not native.conv_pool_stats_applies(torch.zeros(xs), torch.zeros(ws), pad), (xs, ws)
        with pytest.raises(ValueError, match="not one it computes"):
            native.conv_pool_stats(torch.zeros(xs), torch.zeros(ws), None, pad)


@pytest.mark.parametrize("case", ["input needs its gradient", "frozen convolution", "no bias", "stride 2",
                                  "eval mode", "a γ below zero", "NCHW model", "fp16 autocast"])
def test_first_conv_block_path_only_where_it_computes_the_same(case):
    """Where the one-pass backward does not apply, the convolution runs as a module and the block after it
    as the native block (or the modules); either way the gradients are the modules'."""
    seq = _conv_block(3, 16, 3, 1, bias=case != "no bias")
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    if case == "input needs its gradient":
        x.requires_grad_()
    elif case == "frozen convolution":
        seq[0].weight.requires_grad_(False)
        seq[0].bias.requires_grad_(False)
    elif case == "stride 2":
        seq[0].stride = (2, 2)
    elif case == "eval mode":
        seq.eval()
    elif case == "a γ below zero":
        with torch.no_grad():
            seq[2].weight[3] = -0.5
    elif case == "NCHW model":
        seq, x = seq.to(memory_format=torch.contiguous_format), x.contiguous()
    with torch.autocast("cpu", dtype=torch.float16, enabled=case == "fp16 autocast"):  # no fp16 kernels
        out = seq(x)
    taken = type(out.grad_fn).__name__ == "_NativeConvReLUBatchNormMaxPoolBackward"
    assert taken == (case == "no bias")
    if case in ("eval mode", "fp16 autocast"):
        return
    g = torch.randn(out.shape)
    ours, theirs = _conv_run(seq, x, g, True, steps=1), _conv_run(seq, x, g, False, steps=1)
    for a, b in zip(ours[2], theirs[2]):
        assert (a is None) == (b is None) and (a is None or _rel(a, b) < 1e-5)


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "float32"])
def conv_dtype(request):
    """The few-channel convolution's kernels in each dtype: bf16's dot-product pair, built wherever the CPU has
    AVX-512 BF16 (and then it must be there), and float32's, built everywhere."""
    if request.param == torch.bfloat16:
        need_bf16_kernel(native.dot_conv_available(), "the conv_relu kernels")  # GCC < 10 lacks their intrinsics
    _NativeConvReLU.enabled = True
    yield request.param
    _NativeConvReLU.enabled = None


def test_the_few_channel_convolution_is_taken_by_default_only_where_measured():
    """bf16: AVX-512 BF16 without AMX, measured faster than oneDNN's bf16 convolution there (dot_conv_bench); with
    AMX oneDNN has its tile kernels, which it was not measured against; without AVX-512 BF16 it is not built.
    float32: AVX2 without AVX-512, measured faster than oneDNN's fp32 convolution there; not measured with AVX-512."""
    assert native.dot_conv_pays({"avx2", "avx512f", "avx512_bf16"}) is True
    assert native.dot_conv_pays({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) is False
    assert native.dot_conv_pays({"avx2", "avx512f", "avx512bw"}) is False and native.dot_conv_pays({"avx2"}) is False
    assert native.dot_conv_available() <= ("avx512_bf16" in cpu_flags())  # built only where the CPU has it
    assert native.f32_conv_pays({"avx", "avx2", "fma"}) is True
    assert native.f32_conv_pays({"avx2", "avx512f"}) is False
    assert native.f32_conv_pays({"avx2", "avx512f", "avx512_bf16"}) is False
    assert native.f32_conv_pays({"sse4_2", "avx"}) is False and native.f32_conv_pays(set()) is False
    # float32: ≤ 10 input and 20–24 output channels, rows of ≥ 16 output columns, where it was measured faster (8 → 8,
    # 6 → 16, 12 → 24 and rows of 9 columns were not)
    assert native.conv_relu_shape(10, 20, 27, torch.float32) and native.conv_relu_shape(3, 24, 16, torch.float32)
    assert not any(native.conv_relu_shape(ci, co, w, torch.float32)
                   for ci, co, w in [(8, 8, 27), (6, 16, 27), (12, 24, 27), (10, 25, 27), (10, 20, 9), (10, 20, 15)])
    assert native.conv_relu_shape(8, 8, 9, torch.bfloat16) and native.conv_relu_shape(12, 24, 2, torch.bfloat16)
    assert not native.conv_relu_shape(13, 8, 27, torch.bfloat16) and not native.conv_relu_shape(8, 8, 27, torch.float16)
    r = Runtime("cpu", precision="bf16-mixed")
    assert r.native_for(FusedSequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True))) is True
    said = "bf16 dot-product kernel" in r.reasons["native"]
    assert said == (native.dot_conv_pays() and native.dot_conv_available())
    assert "float32 kernel" not in r.reasons["native"]
    r = Runtime("cpu", precision="32")
    assert r.native_for(FusedSequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True))) is True
    assert "dot-product" not in r.reasons["native"]  # a bf16 kernel
    assert ("float32 kernel" in r.reasons["native"]) == native.f32_conv_pays()
    x = torch.randn(2, 6, 12, 20).contiguous(memory_format=torch.channels_last)  # rows of 18 output columns
    for co in (20, 8):
        seq = FusedSequential(nn.Conv2d(6, co, 3), nn.ReLU(inplace=True)).to(memory_format=torch.channels_last)
        taken = type(seq(x).grad_fn).__name__ == "_NativeConvReLUBackward"  # float32, the default switch (None)
        assert taken == (native.f32_conv_pays() and co == 20)


DOT_CONVS = [  # (batch, input channels, height, width, output channels, KH, KW): the second paper's (its 64×64
    # images); odd channel counts; rows of several 16- and 32-column chunks; kernels wider than a block of 5
    # columns; the most channels taken (12 in, 24 out); a 1×1 kernel; a single image
    (4, 10, 31, 31, 20, 5, 5), (3, 3, 12, 40, 7, 3, 3), (2, 11, 9, 9, 24, 7, 6), (2, 1, 5, 70, 2, 2, 3),
    (1, 12, 6, 6, 1, 1, 1), (2, 5, 20, 35, 13, 4, 2),
    (2, 4, 20, 36, 6, 5, 5), (2, 4, 36, 32, 6, 5, 5), (1, 2, 8, 48, 3, 3, 1),  # rows of exactly 32, 16 or 48 columns
    (2, 3, 7, 9, 11, 2, 2), (3, 2, 9, 17, 9, 3, 3)]  # output rows of 8 and 15 columns (AVX2's lanes: one chunk, one
    # short of two); 11 and 9 channels: odd blocks


def _reference(n, ci, h, w, co, kh, kw, dtype=torch.bfloat16, seed=0):
    """x (channels-last, in dtype), weights and bias (float32), and relu(conv) with its gradients in float64 from
    the values rounded to dtype — what an exact convolution in dtype computes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(co, ci, kh, kw, generator=g) * 0.3, torch.randn(co, generator=g) * 0.3
    xr = x.double().requires_grad_()
    wr, br = wt.to(dtype).double().requires_grad_(), b.to(dtype).double().requires_grad_()
    y = F.conv2d(xr, wr, br).relu()
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy.double())
    return x, wt, b, gy, y.detach(), xr.grad, wr.grad, br.grad


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest element's error against the largest value (_rel's norm would let a few values be far off)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def dot_conv():
    """The bf16 dot-product convolution: built wherever the CPU has AVX-512 BF16 (and then it must be there)."""
    need_bf16_kernel(native.dot_conv_available(), "the conv_relu kernels")  # GCC < 10 lacks their intrinsics


def _exact(shape, dtype):
    """relu(conv2d) forward and its three gradients against float64 on the same values: in bf16 the output and
    the input gradient within their one bf16 rounding, in float32 within float sums' error; the weight and bias
    gradients (summed in float, returned in float32) to 1e-5."""
    bf16 = dtype == torch.bfloat16
    x, wt, b, gy, y, dx, dw, db = _reference(*shape, dtype=dtype)
    got = native.conv_relu_forward(x, wt, b, dtype)
    assert got.dtype == dtype and got.is_contiguous()  # (N, C, H, W): the order a dense layer reads
    assert _max_rel(got, y) < (2 ** -8 if bf16 else 1e-5)
    assert torch.equal(got > 0, y.to(dtype) > 0)  # ReLU where the exact output is ≤ 0, and only there
    gx, gw, gb = native.conv_relu_backward(gy, got, x, wt, True, True)
    assert gx.dtype == dtype and gx.is_contiguous(memory_format=torch.channels_last)
    assert _max_rel(gx, dx) < (2 ** -7 if bf16 else 1e-5)
    assert gw.dtype == torch.float32 and _max_rel(gw, dw) < 1e-5 and _max_rel(gb, db) < 1e-5
    none_x, gw2, none_b = native.conv_relu_backward(gy, got, x, wt, False, False)
    assert none_x is None and none_b is None and torch.equal(gw2, gw)


@pytest.mark.parametrize("shape", DOT_CONVS)
def test_dot_product_convolution_is_an_exact_bf16_convolution(dot_conv, shape):
    _exact(shape, torch.bfloat16)


@every_build  # 8 lanes and 5 channels a register block with AVX2, 16 and 10 with AVX-512
@pytest.mark.parametrize("shape", DOT_CONVS)
def test_float32_few_channel_convolution_is_an_exact_convolution(shape):
    _exact(shape, torch.float32)


def _keeps_nan(dtype):
    """A NaN pixel makes every output over it NaN (ReLU keeps NaN, as torch's), and ReLU's backward passes the
    gradient there (threshold_backward's y ≤ 0 test is false for NaN)."""
    x, wt, b, *_ = _reference(2, 4, 10, 10, 6, 3, 3, dtype=dtype)
    x[1, 2, 4, 5] = float("nan")
    y = native.conv_relu_forward(x, wt, b, dtype)
    nan = torch.zeros(2, 6, 8, 8, dtype=torch.bool)
    nan[1, :, 2:5, 3:6] = True
    assert torch.equal(y.isnan(), nan)
    gy = torch.zeros(y.shape, dtype=dtype)
    gy[1, 0, 3, 4] = 1
    _, dw, db = native.conv_relu_backward(gy, y, x, wt, True, True)
    assert db[0] == 1 and db[1:].eq(0).all() and dw[0].isnan().any()
    # an infinite pixel in the last column: torch forms its products with the gradient only at the last kernel
    # column, so the others stay finite (no 0 · Inf from the lanes past the output's width: rows of 9 output
    # columns, a chunk's tail with 8 lanes as with 16)
    x, wt, b, *_ = _reference(2, 4, 10, 11, 6, 3, 3, dtype=dtype)
    x[0, 1, 5, 10] = float("inf")
    y = native.conv_relu_forward(x, wt, b, dtype)
    _, dw, _ = native.conv_relu_backward(torch.ones(y.shape, dtype=dtype), y, x, wt, False, True)
    assert dw[:, :, :, :2].isfinite().all() and dw[:, [0, 2, 3]].isfinite().all()


def test_float32_few_channel_convolution_sums_a_whole_batch_without_bias():
    """The second paper's layer at batch 128 and no bias: the weight gradient, summed in float lanes over each
    thread's 64 images (the lanes and threads then in double), still within 1e-5 of float64; the output without a
    bias term; the bias gradient not asked for."""
    x, wt, _, gy, *_ = _reference(128, 10, 31, 31, 20, 5, 5, dtype=torch.float32, seed=3)
    xr, wr = x.double().requires_grad_(), wt.double().requires_grad_()
    y = F.conv2d(xr, wr).relu()
    y.backward(gy.double())
    got = native.conv_relu_forward(x, wt, None, torch.float32)
    assert _max_rel(got, y.detach()) < 1e-5
    gx, gw, gb = native.conv_relu_backward(gy, got, x, wt, True, False)
    assert gb is None and _max_rel(gx, xr.grad) < 1e-5 and _max_rel(gw, wr.grad) < 1e-5


def test_dot_product_convolution_keeps_nan_and_passes_its_gradient(dot_conv):
    _keeps_nan(torch.bfloat16)


@every_build
def test_float32_few_channel_convolution_keeps_nan_and_passes_its_gradient():
    _keeps_nan(torch.float32)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_second_papers_net_trains_through_the_few_channel_convolution(conv_dtype, batch_norm):
    """The second paper's net under bf16 autocast or in float32: its 10 → 20-channel convolution + ReLU is taken
    (not with batch norm after it), the dense layer reads its NCHW output as it is, and ten Adam steps on the
    built-in silhouettes end at torch's loss (and learn)."""
    from cnnlab.data import load_source
    from cnnlab.models import create_model

    ds = load_source("animal-shapes-5", max_per_class=32, image_size=48, channels=3)  # rows of 19 columns there
    x = ((torch.as_tensor(ds.images[:160]).float() / 255 - 0.3) / 0.4).contiguous(memory_format=torch.channels_last)
    y = torch.as_tensor(ds.labels[:160])
    torch.manual_seed(0)
    m0 = create_model("alkhairi-cnn", num_classes=5, in_channels=3, image_size=48, dropout=0.0, batch_norm=batch_norm)
    m0 = m0.to(memory_format=torch.channels_last)
    losses = {}
    for on in (True, False):
        _NativeConvReLU.enabled = on
        m = copy.deepcopy(m0)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for _ in range(10):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=conv_dtype == torch.bfloat16):
                features = m.backbone(x)
                loss = F.cross_entropy(m.head(features).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        taken = type(features.grad_fn).__name__ == "_NativeConvReLUBackward"
        assert taken == (on and not batch_norm)
        assert features.is_contiguous() == taken  # torch's convolution leaves it channels-last
        assert features.dtype == conv_dtype
        losses[on] = loss.item()
    if conv_dtype == torch.bfloat16:
        assert losses[True] == pytest.approx(losses[False], rel=0.03, abs=0.01)
    else:  # float sums in another order only
        assert losses[True] == pytest.approx(losses[False], rel=1e-3, abs=1e-4)
    assert losses[True] < 1.4  # it learned: ln 5 = 1.61 at the start


@pytest.mark.parametrize("case", ["taken", "no gradients", "padded", "strided", "16 input channels",
                                  "not the last", "fp16 autocast", "half parameters", "switched off",
                                  "a forward hook"])
def test_few_channel_convolution_only_where_it_computes_the_same(conv_dtype, case):
    """Only a stride-1 unpadded few-channel convolution + ReLU ending the block, in bf16 autocast or float32 with
    gradients."""
    ci = 16 if case == "16 input channels" else 6
    conv = nn.Conv2d(ci, 20, 3, padding=1 if case == "padded" else 0, stride=2 if case == "strided" else 1)
    mods = [conv, nn.ReLU(inplace=True)] + ([nn.Conv2d(20, 8, 1)] if case == "not the last" else [])
    seq = FusedSequential(*mods).to(memory_format=torch.channels_last)
    x = torch.randn(2, ci, 12, 20).contiguous(memory_format=torch.channels_last)  # rows of 18 (padded 20) columns
    if case == "half parameters":
        seq, x = seq.half(), x.half()
    seen = []
    if case == "a forward hook":  # a hook on the convolution must see it run (Grad-CAM, weight_norm…)
        conv.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    _NativeConvReLU.enabled = case != "switched off"
    dtype = torch.float16 if case == "fp16 autocast" else torch.bfloat16
    autocast = conv_dtype == torch.bfloat16 or case == "fp16 autocast"
    with torch.autocast("cpu", dtype=dtype, enabled=autocast), torch.set_grad_enabled(case != "no gradients"):
        out = seq(x)
    taken = out.grad_fn is not None and type(out.grad_fn).__name__ == "_NativeConvReLUBackward"
    assert taken == (case == "taken")
    assert len(seen) == (case == "a forward hook")
    if taken:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ref = F.relu(conv(x))
        assert out.dtype == conv_dtype and _max_rel(out, ref) < (2 ** -7 if autocast else 1e-5)


@pytest.mark.parametrize("kernel,dtype", [("pool_stats", torch.float32), ("conv_pool_wgrad", torch.float32),
                                          ("pool_backward_wgrad", torch.float32), ("pool_backward_wgrad", torch.bfloat16),
                                          ("conv_pool_forward", torch.float32), ("conv_pool_forward", torch.bfloat16),
                                          ("conv_pool_forward_cl", torch.bfloat16),
                                          ("conv_relu_forward", torch.bfloat16), ("conv_relu_backward", torch.bfloat16),
                                          ("conv_relu_forward", torch.float32), ("conv_relu_backward", torch.float32),
                                          ("conv_pool_stats", torch.bfloat16)])
def test_a_kernel_without_memory_for_its_scratch_raises_memory_error(kernel, dtype):
    """Asked for rows of 2⁴⁰ positions (and no images, so nothing is read), the kernels' scratch allocation
    fails: they skip their work and say so, and the call raises MemoryError instead of crashing."""
    if kernel.startswith("conv_relu") and dtype == torch.bfloat16 and not native.dot_conv_available():
        pytest.skip("the bf16 dot-product convolution is built only for CPUs with AVX-512 BF16")
    if kernel == "conv_pool_stats" and not native.conv_pool_stats_available():
        pytest.skip("conv_pool_stats is built only for CPUs with AVX-512 BF16")
    if kernel == "conv_pool_forward_cl" and not hasattr(native.library(), "cnnlab_conv_pool_forward_cl_bf16"):
        pytest.skip("the stem forward from float32 channels-last is built only for CPUs with AVX-512 BF16")
    buf = torch.zeros(64)
    p = buf.data_ptr()
    with pytest.raises(MemoryError, match=kernel):
        if kernel == "pool_stats":
            native._kernel(kernel, torch.float32)(p, 0, 2, 1 << 40, 16, p, p, None, 1, 0, 2)
        elif kernel == "conv_pool_wgrad":
            native._kernel(kernel, torch.float32)(p, 0, 3, 3, 3, 3, 3, p, p, p, 1, 1 << 40, 10, p, 2)
        elif kernel == "pool_backward_wgrad":  # 2⁴⁰ channels: its accumulators
            native._kernel(kernel, dtype)(p, p, p, p, p, p, 0, 2, 2, 1 << 40, p, 1, 1, 1, p, 0, 2)
        elif kernel == "conv_relu_forward":  # 2⁴⁰ output channels: its weights' scratch
            native._kernel(kernel, dtype)(p, 0, 3, 3, 2, p, p, 1 << 40, 1, 1, p, 2)
        elif kernel == "conv_pool_stats":  # rows of 2⁴⁰ columns: its pair rows' scratch
            native._kernel(kernel, dtype)(p, 0, 4, 1 << 40, p, p, 32, 3, 3, 1, 1, p, p, p, p, 2)
        elif kernel == "conv_relu_backward":  # 2⁴⁰ output channels: its weight-gradient lanes
            native._kernel(kernel, dtype)(p, p, p, 0, 3, 3, 2, p, 1 << 40, 1, 1, p, p, p, 2)
        else:  # 2⁴⁰ output channels: its weights' scratch
            native._kernel(kernel, dtype)(p, 0, 3, 3, 3, 3, 3, p, p, p, p, 1, 1, 1 << 40, 2)  # bf16: its own code
    out = torch.zeros(1, 16, 1, 1)  # and the library still works afterwards
    pooled, idx, _ = native.pool_stats(torch.ones(1, 16, 2, 2).contiguous(memory_format=torch.channels_last),
                                       relu=True, stats=False)
    assert torch.equal(pooled, out + 1)


# --------------------------------------------------------------------------- batch augmentation's warp

@pytest.fixture
def warp_calls(monkeypatch):
    """How many times augment_batch called the kernel: a test comparing native=True with torch's path must see
    it called, or both sides would be torch's."""
    calls, kernel = [], native.warp_affine

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(native, "warp_affine", counted)
    return calls


def _warp_inputs(layout: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if layout == "first paper's batch":
        return torch.randn(128, 1, 28, 28, generator=g)
    if layout == "channels-last, odd sides":
        return torch.randn(5, 3, 17, 31, generator=g).contiguous(memory_format=torch.channels_last)
    if layout == "3 channels, NCHW":
        return torch.randn(3, 3, 12, 20, generator=g)
    if layout == "one image, one row":
        return torch.randn(1, 2, 1, 9, generator=g)
    if layout == "one column, channels-last":
        return torch.randn(3, 3, 8, 1, generator=g).contiguous(memory_format=torch.channels_last)
    return torch.randn(4, 2, 40, 9, generator=g).transpose(2, 3)  # rows not back to back in the output either


@every_build
@pytest.mark.parametrize("layout", ["first paper's batch", "channels-last, odd sides", "3 channels, NCHW",
                                    "one image, one row", "one column, channels-last", "transposed"])
@pytest.mark.parametrize("settings", [dict(rotation=5, hflip=0.5, scale=0.05, translate=0.05),
                                      dict(rotation=40, hflip=0.0, scale=0.3, translate=0.3),
                                      dict(rotation=0, hflip=1.0, scale=0.0, translate=0.25)])
def test_the_warp_kernel_is_torchs_flip_grid_and_grid_sample(layout, settings, warp_calls):
    """The kernel's flip and warp against torch's path on the same draws: every image within float rounding of
    the values' range (the border's repeated pixels, flips with and without a warp, large angles pulling pixels
    from outside, sides of one pixel, a batch of one), in x's memory format, and the generator left where torch's
    path leaves it."""
    from cnnlab.data.augment import augment_batch

    x = _warp_inputs(layout)
    g_torch, g_native = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = augment_batch(x, g_torch, **settings)
    got = augment_batch(x, g_native, native=True, **settings)
    assert warp_calls == [x.shape]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(x.abs().max()))
    assert got.stride() == x.stride()  # x's layout, the transposed one too
    assert torch.equal(g_native.get_state(), g_torch.get_state())


def test_the_warp_kernel_keeps_infinite_and_nan_pixels_as_grid_sample_does(warp_calls):
    """An infinite pixel stays infinite (not NaN) where its weight is not 0, NaN where grid_sample makes it NaN."""
    from cnnlab.data.augment import augment_batch

    x = torch.randn(6, 2, 10, 12, generator=torch.Generator().manual_seed(1))
    x[0, 0, 4, 5], x[1, 1, 0, 0], x[2, 0, 9, 11], x[3, 1, 5, 5] = float("inf"), float("-inf"), float("inf"), float("nan")
    settings = dict(rotation=10, hflip=0.5, scale=0.1, translate=0.1)
    want = augment_batch(x, torch.Generator().manual_seed(4), **settings)
    got = augment_batch(x, torch.Generator().manual_seed(4), native=True, **settings)
    assert warp_calls == [x.shape] and want.isinf().any() and want.isnan().any()
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4, equal_nan=True)


@every_build
def test_the_warp_kernel_keeps_flipped_images_exact():
    """A flip and a pure shift by whole pixels lands on pixel centres: the kernel gives the mirrored, shifted
    pixels themselves, the border repeated; it refuses what it does not compute."""
    x = torch.arange(2 * 1 * 4 * 8, dtype=torch.float32).view(2, 1, 4, 8)
    draws = torch.tensor([[0.0, 0.9], [0.5, 0.5], [0.5, 0.5], [1.0, 0.5], [0.5, 0.5]])  # flip 1st; shift 1st by +x
    # hflip 0.5: the first image flipped (0.0 < 0.5), the second not; translate 0.125 of 8 columns = 1 pixel
    got = native.warp_affine(x, draws, 0.0, 0.0, 0.125, 0.5)
    flipped = x[0, 0].flip(1)
    want0 = torch.cat([flipped[:, 1:], flipped[:, -1:]], 1)  # sampled one column right: the last repeated
    torch.testing.assert_close(got[0, 0], want0, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], x[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"draws must be float32 \(5, 2\)"):
        native.warp_affine(x, draws[:4], 0.0, 0.0, 0.125, 0.5)
    with pytest.raises(ValueError, match="float32 CPU batch"):
        native.warp_affine(x.double(), draws, 0.0, 0.0, 0.125, 0.5)


def test_augmented_runs_take_the_warp_kernel_for_any_model_unless_switched_off(warp_calls):
    """`data.augment=true` on the CPU: the run's batch augmentation goes through the kernel (env.json says so),
    also for a model without fused blocks (whose `native` reason then says the kernels serve the warp alone) and
    with train.fused=false; not with train.native=false, nor for flips alone; BatchAugment.enabled forces either
    path, the same images within rounding."""
    from cnnlab.config import load_config
    from cnnlab.data.augment import BatchAugment
    from cnnlab.experiment import build_experiment
    from cnnlab.training.progress import ProgressLogger

    def built(*overrides):
        cfg = load_config(None, ["data.max_per_class=20", "data.augment=true", "train.epochs=1", *overrides])
        b = build_experiment(cfg, ProgressLogger("none"))
        return b, b.runtime.describe()["defaults_because"]

    for overrides in (["model.name=harahap-cnn"], ["model.name=mlp"], ["train.fused=false"]):
        b, why = built(*overrides)
        assert isinstance(b.data.train.augment, BatchAugment) and b.data.train.augment.native is True
        assert why["augment"].startswith("flip and affine warp")
        assert b.runtime.describe()["native"] is (overrides == ["model.name=harahap-cnn"])
        if overrides != ["model.name=harahap-cnn"]:
            assert why["native"] == ("off for the blocks: " + ("the model has no fused conv blocks" if overrides ==
                                     ["model.name=mlp"] else "train.fused=false")
                                     + "; compiled for the batch augmentation's warp alone")
    b, why = built("train.native=false")
    assert b.data.train.augment.native is False and why["augment"].endswith("(train.native=false)")
    assert built("data.augment=false")[0].data.train.augment is None
    b, why = built("data.aug_rotation=0", "data.aug_scale=0", "data.aug_translate=0", "data.aug_hflip=0.5")
    assert b.data.train.augment.native is False and why["augment"].startswith("flips only")
    b, _ = built()
    x = b.data.train.normalizer(b.data.train.images[:8])
    state = b.data.train.aug_generator.get_state()
    try:
        outs = {}
        for on in (True, False):
            BatchAugment.enabled = on
            b.data.train.aug_generator.set_state(state)
            outs[on] = b.data.train.augment(x)
    finally:
        BatchAugment.enabled = None
    assert warp_calls == [x.shape]  # the forced native path only
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-4)
    assert not torch.equal(outs[True], x)
