"""Hand-written CPU training paths, each computing what the modules compute (tests/test_fused.py):
ReLU → BatchNorm2d → MaxPool2d(2) as one autograd function (the papers' conv block, fused); ReLU → MaxPool2d(2)
pooled first, and after a first convolution whose input needs no gradient, that convolution's weight gradient
formed from the pooled gradient (_NativeConvMaxPoolReLU: the second paper's stem) or, before ReLU → batch norm →
max-pool, from the block's gradient without writing it in full (_NativeConvReLUBatchNormMaxPool: the first
paper's); a few-channel last convolution + ReLU in the native kernels — bf16 with AVX-512 BF16's dot products, or
float32 on AVX2 —, its output in the dense layer's (C, H, W) order (_NativeConvReLU: the second paper's 10 → 20);
depthwise convolutions trained in fp32 under bf16 autocast (CpuConv2d, below).

The fused block:

Written by hand because torch's three CPU kernels and their backward passes each walk the whole
conv activation (the first paper's is 128×32×28×28 floats per batch), and on a 2-core CPU those
passes, not the arithmetic, are most of the step. The fused version computes the same thing with
fewer of them (`python benchmarks/switches_bench.py`, BENCHMARKS.md):

- forward: ReLU in place; the batch statistics in one pass (`torch.batch_norm_update_stats`, which also
  updates the running statistics exactly as BatchNorm2d does); max-pool the ReLU output *before* the
  affine, which is allowed because y = γ·(x − μ)/σ + β is increasing in x per channel when γ > 0, so
  the max of the normalised window is the normalised max (same index, same value); the affine then
  runs on the 4× smaller pooled tensor. The only full-sized write is the in-place ReLU.
- backward: batch norm's input gradient is γ/σ·(dz − mean(dz) − x̂·mean(dz·x̂)), and dz is non-zero only at
  the pooled positions, so both means come from the small pooled tensors. What is left is one
  per-channel affine of the saved activation, a scatter of the pooled gradient to its argmax
  positions, and the ReLU mask, in place.

Where cnnlab's native kernels are built (native.py: C, compiled once per machine) and the activation is
channels-last, both blocks run through them instead (`_NativeReLUBatchNormMaxPool`, `_NativeMaxPoolReLU`), in
float32 or bf16 — the torch-op version below is for fp32 alone, because in bf16 torch's scatter and mixed-dtype
ops went through full-sized fp32 copies and made it slower than the modules.

`FusedSequential` is an nn.Sequential (same children, same state-dict keys) that takes this path
for each ReLU → BatchNorm2d → MaxPool2d(2) run (with the convolution before it, when that is the first)
when it applies (training-mode batch norm with affine
weights all > 0, float32 4-D input — or bf16 channels-last for the native kernels —, gradients on; on the
CPU unless asked for) and the modules' own path otherwise: evaluation, inference and saved models never see
it. `set_fusion(model, False)` (config `train.fused=false`) turns it off; `set_fusion(model, True, False)`
(`train.native=false`) keeps the fusion on torch's ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import native


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also plain contiguous, as 1-channel or 1×1 ones are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _plane_view(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, C, H, W) → (N, H·W, C) if channels_last else (N, C, H·W): a view when `t` is laid out so."""
    n, c = t.shape[:2]
    return t.permute(0, 2, 3, 1).reshape(n, -1, c) if channels_last else t.reshape(n, c, -1)


def _bn_grad_terms(weight, invstd, mean, dweight, dbias, m: int):
    """Batch norm's input gradient, per channel, as dy = a·dz + k·x + b over the m values it normalised."""
    a = weight * invstd                      # ∂(output)/∂(relu output) at the pooled positions
    k = -a * invstd * dweight / m            # the x̂·mean(dz·x̂) term, per unit of relu output
    b = -a * dbias / m - k * mean            # the mean(dz) term, with k's centring
    return a, k, b


class _ReLUBatchNormMaxPool(torch.autograd.Function):
    """maxpool2(batchnorm_train(relu(y))) with γ > 0; y (the conv output) is overwritten by relu(y)."""

    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, momentum: float, eps: float):
        ctx.set_materialize_grads(False)
        r = y.relu_()
        ctx.mark_dirty(y)
        mean, var = torch.batch_norm_update_stats(r, running_mean, running_var, momentum)  # var: biased
        invstd = (var + eps).rsqrt()
        scale = weight * invstd
        shift = bias - mean * scale
        pooled, idx = F.max_pool2d_with_indices(r, 2, 2)
        out = torch.addcmul(shift.view(1, -1, 1, 1), pooled, scale.view(1, -1, 1, 1))
        ctx.save_for_backward(r, pooled, idx, mean, invstd, weight)
        return out, y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_relu):
        r, pooled, idx, mean, invstd, weight = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        n, c, h, w = r.shape
        m = n * h * w
        xhat = (pooled - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        dbias = grad.sum((0, 2, 3))
        dweight = (grad * xhat).sum((0, 2, 3))
        a, k, b = _bn_grad_terms(weight, invstd, mean, dweight, dbias, m)
        cl = is_channels_last(r)  # d in one of the two layouts _plane_view can view without a copy
        d = torch.empty_like(r, memory_format=torch.channels_last if cl else torch.contiguous_format)
        torch.addcmul(b.view(1, -1, 1, 1), r, k.view(1, -1, 1, 1), out=d)
        sparse = grad * a.view(1, -1, 1, 1)  # the pooled gradient, to go to each window's argmax
        _plane_view(d, cl).scatter_add_(1 if cl else 2, _plane_view(idx, cl), _plane_view(sparse, cl))
        torch.ops.aten.threshold_backward.grad_input(d, r, 0, grad_input=d)  # the ReLU mask, in place
        return d, dweight, dbias, None, None, None, None


class _NativeReLUBatchNormMaxPool(torch.autograd.Function):
    """The same block through the native kernels (native.py): y (channels-last, float32 or bf16) is left as it
    is; the forward reads it once, the backward once more to write its gradient; the rest works on the 4×
    smaller pooled tensors."""

    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, momentum: float, eps: float):
        ctx.set_materialize_grads(False)
        out, saved = _native_bn_pool(y, weight, bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(y, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, pooled, idx, mean, invstd, weight = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        a, k, b, dweight, dbias = _native_bn_pool_grads(y, grad, pooled, mean, invstd, weight)
        return native.pool_backward(y, idx, grad, a, k, b), dweight, dbias, None, None, None, None


def _native_bn_pool(y, weight, bias, running_mean, running_var, momentum: float, eps: float, pooled_stats=None):
    """The native block's forward on the convolution output y: (its output, the tensors its backward needs
    after y: pooled, idx, mean, invstd, weight); the running statistics updated as BatchNorm2d updates them.
    pooled_stats: pool_stats' (pooled, idx, sums) of y where already formed (native.conv_pool_stats)."""
    n, c, h, w = y.shape
    m = n * h * w
    pooled, idx, sums = pooled_stats or native.pool_stats(y, relu=True, stats=True)
    mean64 = sums[:c] / m
    var64 = (sums[c:] / m - mean64 * mean64).clamp_(min=0.0)  # biased, as batch norm normalises with
    if running_mean is not None:  # BatchNorm2d's update: the unbiased variance, momentum-weighted
        running_mean.mul_(1.0 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_((var64 * (m / max(m - 1, 1))).to(running_var.dtype),
                                              alpha=momentum)
    mean, invstd = mean64.float(), (var64.float() + eps).rsqrt()
    scale = weight * invstd
    return native.pool_affine(pooled, scale, bias - mean * scale), (pooled, idx, mean, invstd, weight)


def _native_bn_pool_grads(y, grad, pooled, mean, invstd, weight):
    """Batch norm's backward terms (a, k, b: see _bn_grad_terms) and its weight and bias gradients."""
    n, c, h, w = y.shape
    sum_g, sum_gp = native.pool_grad_sums(grad, pooled)
    dbias = sum_g.float()
    dweight = ((sum_gp - mean.double() * sum_g) * invstd.double()).float()  # Σ g·x̂
    return (*_bn_grad_terms(weight, invstd, mean, dweight, dbias, n * h * w), dweight, dbias)


class WgradDot:
    """Whether _NativeConvReLUBatchNormMaxPool's weight gradient takes bf16 dot products (native.pool_backward_wgrad's
    `dot`). None: by the CPU (native.wgrad_dot_pays, a bf16 block); True / False: always / never (tests,
    `benchmarks/conv_block_bench.py`)."""

    enabled: bool | None = None


class ConvPoolStats:
    """Whether _NativeConvReLUBatchNormMaxPool's forward, in bf16, forms the convolution and pool_stats in one native
    pass (native.conv_pool_stats) rather than torch's convolution + native.pool_stats. None: by the CPU
    (native.conv_pool_stats_pays) where the shapes allow; True / False: wherever they allow / never (tests,
    `benchmarks/conv_block_bench.py`)."""

    enabled: bool | None = None


def _one_pass_conv(x: torch.Tensor, cweight: torch.Tensor, cbias: torch.Tensor | None,
                   padding: tuple[int, int]) -> bool:
    on = ConvPoolStats.enabled
    return (on is not False and _stem_dtype(cweight, cbias) == torch.bfloat16
            and (on or native.conv_pool_stats_pays()) and native.conv_pool_stats_applies(x, cweight, padding))


class _NativeConvReLUBatchNormMaxPool(torch.autograd.Function):
    """maxpool2(batchnorm_train(relu(conv2d(x)))) with γ > 0 for an input that needs no gradient (the image batch:
    the first paper's net): torch's convolution and the native block forward (in bf16 for one input channel, the
    convolution, ReLU, the pool and batch norm's sums in one native pass: ConvPoolStats); backward, the block's
    gradient multiplied into the convolution's weight gradient row by row (native.pool_backward_wgrad), so neither
    pool_backward's full-sized gradient nor torch's convolution backward, which reads it, runs."""

    enabled: bool | None = None  # None: where native.stem_pays(); True / False: always / never (tests, benchmarks)

    @staticmethod
    def forward(ctx, x, cweight, cbias, padding, weight, bias, running_mean, running_var, momentum: float,
                eps: float):
        ctx.set_materialize_grads(False)
        if _one_pass_conv(x, cweight, cbias, padding):
            y, *pooled_stats = native.conv_pool_stats(x, cweight, cbias, padding)
        else:
            y = F.conv2d(x, cweight, cbias, padding=padding).contiguous(memory_format=torch.channels_last)
            pooled_stats = None
        out, saved = _native_bn_pool(y, weight, bias, running_mean, running_var, momentum, eps, pooled_stats)
        ctx.save_for_backward(x, y, *saved)
        ctx.padding, ctx.kernel_size = padding, tuple(cweight.shape[2:])
        ctx.dtypes = (cweight.dtype, None if cbias is None else cbias.dtype)
        ctx.wstride = cweight.stride()  # the weight's gradient comes back laid out as the weight (DDP's buckets)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, pooled, idx, mean, invstd, weight = ctx.saved_tensors
        if grad is None:
            return (None,) * 10
        a, k, b, dweight, dbias = _native_bn_pool_grads(y, grad, pooled, mean, invstd, weight)
        ph, pw = ctx.padding
        xp = F.pad(x.detach().float(), (pw, pw, ph, ph)) if ph or pw else x.detach().float()
        dw, db = native.pool_backward_wgrad(y, idx, grad, a, k, b, xp, ctx.kernel_size, dot=WgradDot.enabled)
        wdtype, bdtype = ctx.dtypes
        dw = torch.empty_strided(dw.shape, ctx.wstride, dtype=wdtype).copy_(dw)
        return (None, dw, None if bdtype is None else db.to(bdtype), None, dweight, dbias,
                None, None, None, None)


class _NativeMaxPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(y, 2)) through the native kernels: one read of y forward, one write of its gradient
    backward (torch's channels-last max-pool writes int64 indices and zero-fills the gradient first)."""

    @staticmethod
    def forward(ctx, y):
        pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
        ctx.save_for_backward(pooled, idx)
        ctx.shape = y.shape
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        pooled, idx = ctx.saved_tensors
        return native.pool_scatter(ctx.shape, idx, grad, pooled)


def _stem_dtype(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype torch's convolution of a float32 input would compute in here: bf16 under CPU bf16 autocast,
    float32 for float32 parameters without autocast; None otherwise (fp16 autocast, half parameters…)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    plain = weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    return torch.float32 if plain else None


class _NativeConvMaxPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(conv2d(x, weight, bias), 2)) for an input that needs no gradient (the image batch): forward
    in one native pass that never writes the convolution's output (native.conv_pool_forward; in bf16 on a CPU
    with AMX torch's convolution and the native pool, measured faster there: native.stem_forward_pays), and a backward
    that forms the weights' gradient from the pooled gradient alone (native.conv_pool_wgrad) — neither
    pool_scatter's full-sized gradient nor torch's convolution backward, which reads it, runs. The input is read
    in float32, so in bf16-mixed training the weights' gradient is summed from unrounded pixels."""

    # None: the one pass where native.stem_forward_pays for the dtype (not in bf16 with AMX), else torch's
    # convolution, then the native pool; True / False: always / never (benchmarks/stem_bench.py times both)
    native_forward: bool | None = None
    enabled: bool | None = None  # None: where native.stem_pays(); True / False: always / never (tests, benchmarks)

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype, one_pass = _stem_dtype(weight, bias), _NativeConvMaxPoolReLU.native_forward
        if native.stem_forward_pays(dtype) if one_pass is None else one_pass:
            pooled, idx = native.conv_pool_forward(x, weight, bias, dtype)
        else:
            y = F.conv2d(x, weight, bias).contiguous(memory_format=torch.channels_last)
            pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
        ctx.save_for_backward(x, pooled, idx)
        ctx.kernel_size, ctx.dtypes = tuple(weight.shape[2:]), (weight.dtype, None if bias is None else bias.dtype)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, pooled, idx = ctx.saved_tensors
        if grad is None:
            return None, None, None
        dw, db = native.conv_pool_wgrad(x, ctx.kernel_size, idx, grad, pooled)
        wdtype, bdtype = ctx.dtypes
        return None, dw.to(wdtype), None if bdtype is None else db.to(bdtype)


def _stem(conv: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """A plain stride-1 unpadded convolution, then ReLU → max-pool 2×2: what _NativeConvMaxPoolReLU computes."""
    return _symmetric_padding(conv) == (0, 0) and _pool_first(relu, pool)


def conv_max_pool_relu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor | None:
    """relu(max_pool2d(conv(x), 2)) in one native pass forward, with the pooled-gradient weight backward, or None
    where it does not apply now: a CPU where it does not pay (native.stem_pays), x needs its own gradient (an
    explanation's saliency), no gradients at all, a dtype the kernels do not compute in (fp16 autocast, half
    parameters), or not what native.conv_pool_wgrad_applies to."""
    on = _NativeConvMaxPoolReLU.enabled
    if not ((native.stem_pays() if on is None else on) and torch.is_grad_enabled() and not x.requires_grad
            and (conv.weight.requires_grad or (conv.bias is not None and conv.bias.requires_grad))
            and _stem_dtype(conv.weight, conv.bias) is not None
            and native.conv_pool_wgrad_applies(x, tuple(conv.kernel_size))):
        return None
    return _NativeConvMaxPoolReLU.apply(x, conv.weight, conv.bias)


class _NativeConvReLU(torch.autograd.Function):
    """relu(conv2d(x, weight, bias)) through the native few-channel kernels (native.conv_relu_forward /
    conv_relu_backward): few channels (the second paper's 10 → 20-channel 5×5 convolution), output in plain NCHW
    order, which the dense layer after the block flattens without a copy (torch's channels-last output needed one
    each way) — in bf16 with AVX-512 BF16's dot products under bf16 autocast, in float32 otherwise. The weights' and
    bias's gradients are summed in float and returned in their own dtypes."""

    # None: where native.dot_conv_pays() (bf16) or native.f32_conv_pays() (float32); True / False: always / never
    # (tests, benchmarks)
    enabled: bool | None = None

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        y = native.conv_relu_forward(x, weight, bias, dtype)
        ctx.save_for_backward(x, y, weight)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, weight = ctx.saved_tensors
        xdtype, wdtype, bdtype = ctx.dtypes
        dx, dw, db = native.conv_relu_backward(grad, y, x, weight, ctx.needs_input_grad[0],
                                               bdtype is not None and ctx.needs_input_grad[2])
        return (None if dx is None else dx.to(xdtype)), dw.to(wdtype), (None if db is None else db.to(bdtype)), None


def _hooked(*mods: nn.Module) -> bool:
    """Whether calling these modules would run forward hooks (theirs or global ones), which a fused path skips."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or any(mod._forward_hooks or mod._forward_pre_hooks for mod in mods))


def conv_relu(x: torch.Tensor, conv: nn.Module, relu: nn.Module) -> torch.Tensor | None:
    """relu(conv(x)) through _NativeConvReLU, or None where it does not apply now: a CPU where it does not pay in
    the dtype the convolution computes in (native.dot_conv_pays for bf16 autocast: AVX-512 BF16 without AMX;
    native.f32_conv_pays for float32: AVX2 without AVX-512), no gradients, another dtype (fp16 autocast, half
    parameters), not a plain stride-1 unpadded nn.Conv2d with few channels (native.conv_relu_applies), or forward
    hooks on the modules (or global ones), which it would skip. Its output is plain NCHW, the order of the flatten
    that follows the papers' blocks."""
    on, dtype = _NativeConvReLU.enabled, _stem_dtype(conv.weight, conv.bias)
    if dtype is None:
        return None
    pays = native.dot_conv_pays() if dtype == torch.bfloat16 else native.f32_conv_pays()
    if not ((pays if on is None else on) and torch.is_grad_enabled() and type(conv) is nn.Conv2d
            and not _hooked(conv, relu) and _symmetric_padding(conv) == (0, 0)
            and native.conv_relu_applies(x, conv.weight, dtype)):
        return None
    return _NativeConvReLU.apply(x, conv.weight, conv.bias, dtype)


def max_pool_relu(x: torch.Tensor, use_native: bool = True) -> torch.Tensor:
    """relu(max_pool2d(x, 2)): the native kernels where they apply, else torch's."""
    if use_native and native.applies(x):
        return _NativeMaxPoolReLU.apply(x)
    return F.max_pool2d(x, 2, 2).relu_()


def _pool2(pool: nn.Module) -> bool:
    """A max-pool 2×2, stride 2, no padding: what both fused paths compute."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (2, 2)
            and pair(pool.stride or pool.kernel_size) == (2, 2) and pair(pool.padding) == (0, 0)
            and pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _fusable(relu: nn.Module, bn: nn.Module, pool: nn.Module) -> bool:
    """The module triple this file computes: in-place ReLU, affine BatchNorm2d, max-pool 2×2 stride 2."""
    return type(relu) is nn.ReLU and relu.inplace and type(bn) is nn.BatchNorm2d and bn.affine and _pool2(pool)


def _pool_first(relu: nn.Module, pool: nn.Module) -> bool:
    """ReLU → max-pool 2×2, which commute exactly: max(relu(window)) = relu(max(window)), and the gradients
    agree too (the window's argmax gets the gradient when it is > 0; nothing does otherwise). Pooling first
    runs the ReLU and its backward on a 4× smaller tensor (the second paper's net, batch norm off)."""
    return type(relu) is nn.ReLU and _pool2(pool)


def relu_bn_maxpool(y: torch.Tensor, bn: nn.BatchNorm2d, use_native: bool = True) -> torch.Tensor | None:
    """The fused block on `y` with `bn`'s parameters and statistics, or None when it does not apply
    now (then run the modules): batch norm in eval mode, a γ ≤ 0, no gradients, not 4-D float32 (or bf16
    channels-last for the native kernels, which `use_native` allows where they apply)."""
    if not (_bn_trains(bn) and y.dim() == 4 and y.shape[2] >= 2 and y.shape[3] >= 2):
        return None  # (asked before native.applies, which compiles the kernels on a machine's first call)
    go_native = use_native and native.applies(y)
    if not (y.dtype == torch.float32 or go_native) or not _increasing(bn):
        return None
    momentum = _momentum(bn)
    if go_native:
        return _NativeReLUBatchNormMaxPool.apply(y, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                 momentum, bn.eps)
    out, _ = _ReLUBatchNormMaxPool.apply(y, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                         momentum, bn.eps)
    return out


def _bn_trains(bn: nn.BatchNorm2d) -> bool:
    """Batch norm in training mode with float32 parameters, gradients on: what the fused blocks compute."""
    return bn.training and torch.is_grad_enabled() and bn.weight.dtype == torch.float32


def _increasing(bn: nn.BatchNorm2d) -> bool:
    """Every γ > 0: pooling before the affine needs an increasing affine (γ = 0: a tie that the modules break by
    window position, which then gets γ's gradient). A host sync: asked last."""
    return not bool((bn.weight <= 0).any())


def _momentum(bn: nn.BatchNorm2d) -> float:
    """This step's running-statistics momentum, counting the step as BatchNorm2d does (call once per step)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative average, as BatchNorm2d
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def _strided_channels_last(t: torch.Tensor) -> bool:
    """`t` has channels-last strides — as torch's convolution reads its input and weights to choose its output's
    layout; unlike is_channels_last, also for one channel (whose plain and channels-last strides both pass
    is_contiguous, but only channels-last gives the channel dimension stride 1)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and (t.stride(1) == 1 or t.numel() <= 1)


def _symmetric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """A stride-1, ungrouped, undilated zero-padded convolution's padding as (rows, columns), or None for
    anything else (an even kernel's "same", other padding modes, strides…)."""
    if not (type(conv) is nn.Conv2d and conv.groups == 1 and tuple(conv.stride) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"):
        return None
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        kh, kw = conv.kernel_size
        return ((kh - 1) // 2, (kw - 1) // 2) if kh % 2 and kw % 2 else None
    return tuple(conv.padding)


def conv_relu_bn_maxpool(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor | None:
    """maxpool2(batchnorm(relu(conv(x)))) as _NativeConvReLUBatchNormMaxPool, or None where it does not apply
    now (then the convolution runs as a module and the block after it as relu_bn_maxpool): a CPU where the
    native stems do not pay (native.stem_pays), x needs its own gradient (an explanation's saliency) or is not
    a float32 CPU batch, the convolution's weight needs no gradient, a dtype the kernels do not compute in (fp16
    autocast, half parameters), or what relu_bn_maxpool would refuse (eval mode, a γ ≤ 0…)."""
    on = _NativeConvReLUBatchNormMaxPool.enabled
    if not (_strided_channels_last(x) or _strided_channels_last(conv.weight)):
        return None  # torch's convolution gives an NCHW output here: the model is not channels-last
    padding = _symmetric_padding(conv)
    dtype = _stem_dtype(conv.weight, conv.bias)
    if not ((native.stem_pays() if on is None else on) and padding is not None and dtype is not None
            and _bn_trains(bn) and not x.requires_grad and conv.weight.requires_grad
            and x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
            and x.shape[2] + 2 * padding[0] - conv.kernel_size[0] + 1 >= 2
            and x.shape[3] + 2 * padding[1] - conv.kernel_size[1] + 1 >= 2
            and native.library() is not None and _increasing(bn)):
        return None
    return _NativeConvReLUBatchNormMaxPool.apply(x, conv.weight, conv.bias, padding, bn.weight, bn.bias,
                                                 bn.running_mean, bn.running_var, _momentum(bn), bn.eps)


class FusedSequential(nn.Sequential):
    """nn.Sequential that runs each ReLU → BatchNorm2d → MaxPool2d(2) as `relu_bn_maxpool` when it can, and
    each ReLU → MaxPool2d(2) as max-pool then ReLU (`_pool_first`: the same values and gradients).

    fuse: None (the default) fuses on the CPU only, where it was measured; True or False always or never.
    native: None or True (the default): the native kernels (native.py) where they apply — compiled on first
    use, channels-last float32 or bf16 on the CPU; False: the torch-op path above.
    """

    fuse: bool | None = None
    native: bool | None = None

    def forward(self, x):
        mods = list(self)
        fuse = self.fuse if self.fuse is not None else x.device.type == "cpu"
        use_native = self.native is not False
        i = 0
        while i < len(mods):
            if (fuse and use_native and i + 3 < len(mods) and type(mods[i]) is nn.Conv2d
                    and _fusable(*mods[i + 1:i + 4])):
                out = conv_relu_bn_maxpool(x, mods[i], mods[i + 2])
                if out is not None:
                    x, i = out, i + 4
                    continue
            if fuse and i + 2 < len(mods) and _fusable(*mods[i:i + 3]):
                out = relu_bn_maxpool(x, mods[i + 1], use_native)
                if out is not None:
                    x, i = out, i + 3
                    continue
            if fuse and use_native and i + 2 < len(mods) and _stem(*mods[i:i + 3]):
                out = conv_max_pool_relu(x, mods[i])
                if out is not None:
                    x, i = out, i + 3
                    continue
            if (fuse and use_native and i + 2 == len(mods) and type(mods[i]) is nn.Conv2d
                    and type(mods[i + 1]) is nn.ReLU):  # the block's last convolution, before the dense layers
                out = conv_relu(x, mods[i], mods[i + 1])
                if out is not None:
                    x, i = out, i + 2
                    continue
            if fuse and i + 1 < len(mods) and _pool_first(*mods[i:i + 2]):
                x, i = max_pool_relu(x, use_native), i + 2
                continue
            x = mods[i](x)
            i += 1
        return x


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _slow_bf16_depthwise(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether a depthwise convolution is about to train under bf16 autocast on the CPU (gradients will flow
    through it: not inference, not a frozen backbone) with a kernel whose bf16 backward is slow in torch's CPU
    kernels: all but 3×3 stride 1."""
    return (_depthwise(conv) and x.device.type == "cpu"
            and torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)  # it trains (not frozen)
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)))


class CpuConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that trains a depthwise convolution in fp32 when the
    step runs under bf16 autocast on the CPU.

    Written because torch's bf16 CPU kernels for a depthwise convolution's backward are pathological for
    strided and 5×5 kernels: measured on an AVX-512 BF16 + AMX CPU (torch 2.14, 2 threads, batch 32,
    EfficientNet-Lite0's layers; `benchmarks/cpu_kernels_bench.py`), a 3×3 stride-2 layer on 96×113² takes
    139 ms for its input gradient in bf16 against 35 ms in fp32 (its forward: 6 ms), a 5×5 layer on 240×28²
    75 ms for its weight gradient against 14 ms. Computing these layers in fp32 (the input cast up, autocast
    off around them) makes a training step of EfficientNet-Lite0 at 224 px 1.43× faster (20.7 → 29.6
    images/s), of MobileNet-v3-large 1.57× (30.5 → 47.8). Inference and
    fp32 training take the plain path; `train.fused=false` (set_fusion) turns it off.
    fuse: None (default) or True: on where it applies; False: never.
    """

    fuse: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__.get("_fold_with")  # the batch norm after it (pair_conv_bn), folded in at inference
        weight, bias = _folded(self.weight, self.bias, bn) if bn is not None and _folds(self, bn) else \
            (self.weight, self.bias)
        if self.fuse is not False and _slow_bf16_depthwise(self, x):
            with torch.autocast("cpu", enabled=False):
                return self._conv(x.float(), weight, bias)
        return self._conv(x, weight, bias)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class FoldableBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, same state-dict keys) that passes its input through when the
    convolution before it has folded it in (pair_conv_bn)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.__dict__.get("_folded_into")
        if conv is not None and _folds(conv, self):
            return x
        return super().forward(x)


_UNFOLDED: list = []  # convolutions that run unfolded (True: all), innermost last


class unfolded_batch_norm:
    """Within it, `conv` (None: every convolution) and its batch norm run as two modules: Grad-CAM's hook must
    see its layer's own output."""

    def __init__(self, conv: nn.Module | None = None):
        self.conv = True if conv is None else conv

    def __enter__(self):
        _UNFOLDED.append(self.conv)

    def __exit__(self, *exc):
        _UNFOLDED.pop()


def _folds(conv: nn.Module, bn: nn.BatchNorm2d) -> bool:
    """Whether `bn` is folded into `conv` now: batch norm in eval mode with running statistics, the fused path
    on (`train.fused`, set_fusion), not within unfolded_batch_norm for this convolution."""
    return (not bn.training and bn.running_var is not None and conv.fuse is not False
            and not any(u is True or u is conv for u in _UNFOLDED))


def _folded(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """The weight and bias of a convolution followed by batch norm in eval mode, as one convolution (computed in
    fp32 or the weight's wider type, differentiable in every parameter): w·s, (b − μ)·s + β with
    s = γ / √(σ² + ε)."""
    dt = torch.promote_types(weight.dtype, torch.float32)
    scale = bn.running_var.to(dt).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(dt)
    mean = bn.running_mean.to(dt)
    shift = -mean * scale if bias is None else (bias.to(dt) - mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dt)
    return (weight.to(dt) * scale.view(-1, *[1] * (weight.dim() - 1))).to(weight.dtype), shift.to(weight.dtype)


def pair_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold `bn` into `conv` at inference, for a forward that applies bn right after conv: one convolution with
    batch norm folded into its weight and bias (a few small tensors a pass), and the batch norm passes its input
    through — a walk over the activation fewer, written and read back. Training (batch statistics),
    `train.fused=false` and unfolded_batch_norm run the two modules. The modules keep their parameters and
    state-dict keys (their classes become CpuConv2d and FoldableBatchNorm2d; the pair is not a submodule).
    Backbone features at 224 px, batch 32, 2 threads, on an Intel Xeon with AVX-512 BF16 + AMX
    (`benchmarks/fold_bench.py`): EfficientNet-Lite0 1.54× faster in bf16 channels-last and 1.29× in fp32,
    ResNet-50 1.32× / 1.25×, MobileNetV3-Large 1.28× / 1.44×, ResNet-18 1.09× / 1.07×; the features move by
    rounding only (fp32: ~3e-7 relative; in bf16 as close to fp32's as the two modules' or closer)."""
    if type(conv) is nn.Conv2d:
        conv.__class__ = CpuConv2d
    if type(bn) is nn.BatchNorm2d:
        bn.__class__ = FoldableBatchNorm2d
    if not isinstance(conv, CpuConv2d) or not isinstance(bn, FoldableBatchNorm2d):
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(conv).__name__}")
    conv.__dict__["_fold_with"], bn.__dict__["_folded_into"] = bn, conv


def fold_batch_norms(model: nn.Module) -> int:
    """pair_conv_bn for every batch norm that follows its convolution where the forward is known to apply it to
    the convolution's output: a convolution then a batch norm in a Sequential that runs its children in order
    (VGG-BN, MobileNetV3's Conv2dNormActivation, ResNet's downsample), and torchvision's ResNet stem and blocks'
    convN / bnN (another module's convN / bnN may be ordered otherwise, a pre-activation block's bn1 before
    conv1: left alone). Returns how many it paired (the papers' fused blocks, ReLU between, are not touched)."""
    pairs = []
    for m in model.modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            kids = list(m.children())
            pairs += list(zip(kids, kids[1:]))
        if type(m).__module__.startswith("torchvision.") and type(m).__name__ in ("ResNet", "BasicBlock", "Bottleneck"):
            pairs += [(getattr(m, f"conv{i}", None), getattr(m, f"bn{i}", None)) for i in (1, 2, 3)]
    n = 0
    for conv, bn in pairs:
        if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features
                and "_fold_with" not in conv.__dict__ and "_folded_into" not in bn.__dict__):
            pair_conv_bn(conv, bn)
            n += 1
    return n


def use_cpu_depthwise(model: nn.Module) -> int:
    """Make each plain depthwise nn.Conv2d of `model` (torchvision's MobileNets…) a CpuConv2d, in place (the
    same parameters and keys); returns how many depthwise convolutions `model` now trains through CpuConv2d."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and _depthwise(m):
            if type(m) is nn.Conv2d:
                m.__class__ = CpuConv2d
            n += isinstance(m, CpuConv2d)
    return n


def set_fusion(model: nn.Module, on: bool | None, use_native: bool | None = None) -> int:
    """Turn the fused blocks (and CpuConv2d's fp32 depthwise training) of `model` on, off, or back to the
    default (None: CPU only), and their native kernels on where they apply (None, True) or off (False);
    returns how many FusedSequential modules it holds."""
    seqs = [m for m in model.modules() if isinstance(m, FusedSequential)]
    for m in model.modules():
        if isinstance(m, (FusedSequential, CpuConv2d)):
            m.fuse = on
        if isinstance(m, FusedSequential):
            m.native = use_native
    return len(seqs)
