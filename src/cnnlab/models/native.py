"""cnnlab's native CPU kernels for the papers' conv blocks (native_kernels.c), compiled on first use.

Written by hand because torch's CPU kernels for ReLU, BatchNorm2d and MaxPool2d(2) and their backward
passes each walk the whole convolution output, and on 2 cores those passes, not the arithmetic, are most
of a training step of the papers' small nets. Measured on an AMD EPYC (AVX-512 BF16), torch 2.14, 2
threads, in bf16 channels-last: ReLU → BatchNorm2d → MaxPool2d(2) forward and backward on the first
paper's 128×32×28×28 activation takes 7.2 ms with torch's modules, against 0.1 ms for one read of that
tensor; the second paper's ReLU → MaxPool2d(2) on 128×10×62×62 takes 8.4 ms (torch's channels-last
max-pool writes int64 indices, and its backward zero-fills the whole gradient before scattering into it).
Here the forward is one read of the convolution output (the window maxima, their positions as one byte
each, and batch norm's statistics together), the backward one read and one write; batch norm's affine
runs on the 4× smaller pooled tensor (see fused.py for why pooling first is exact when γ > 0). After a
first convolution whose input needs no gradient (the second paper's stem), conv_pool_forward computes the
convolution, ReLU and pool in one pass without writing the convolution's output (on AVX-512 BF16 CPUs in bf16
with its dot-product instruction; not in bf16 where the CPU has AMX, whose tiles make torch's convolution
faster: stem_forward_pays), and conv_pool_wgrad forms that convolution's weight gradient from the
pooled gradient alone, where the ReLU → max-pool backward would write the full-sized gradient for torch's
convolution backward to read (`benchmarks/stem_bench.py`). After the first paper's first convolution (ReLU →
batch norm → max-pool after it) pool_backward_wgrad computes the block's gradient an image at a time into a
scratch buffer that stays in the core's cache and multiplies it into the convolution's weight gradient there,
instead of pool_backward writing it in full for torch's convolution backward (`benchmarks/conv_block_bench.py`;
in bf16 on CPUs with AVX-512 BF16 and no AMX its products in bf16 dot products, two positions an instruction:
wgrad_dot_pays), and its forward — a 1-channel convolution, ReLU, the pool and batch norm's sums — in one bf16 pass,
y written once (conv_pool_stats, conv_pool_stats_pays). A few-channel convolution + ReLU that ends the block (the
second paper's 10 → 20) runs through conv_relu_forward / conv_relu_backward, whose vector lanes are output columns
rather than the channels oneDNN's blocks leave partly empty: in bf16 on CPUs with AVX-512 BF16 and no AMX
(dot_conv_pays), in float32 on AVX2 CPUs without AVX-512 (f32_conv_pays, conv_relu_shape;
`benchmarks/dot_conv_bench.py`).
Batch augmentation's flip and affine warp (data/augment.py) run in one pass too, warp_affine: θ formed from the
draws, each output pixel sampled bilinearly with the border repeated, as torch's affine_grid + grid_sample do it
in a dozen ops (`benchmarks/augment_bench.py`); taken for any model whose run augments its batches
(Runtime.native_warp). `benchmarks/switches_bench.py` measures the switch (`train.native`), BENCHMARKS.md has the
figures.

The C source is compiled with the machine's C compiler ($CC, else cc or gcc) at -O3 -march=native with
OpenMP into $CNNLAB_CACHE/native (default ~/.cache/cnnlab/native), keyed by the source, the compiler and
the CPU's flags, so a machine compiles it once (about 10 s with GCC 12 on 2 cores, said on stderr while it
runs) and a different CPU never loads code built for another. Without a compiler cnnlab takes the torch-op path (fused.py) and says so in env.json.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..data.dataset import cache_dir
from ..hardware import cpu_flags, usable_flags

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC"]

_LIB: ctypes.CDLL | None = None
_WHY: str | None = None  # why the library is not loaded, once a load failed
_BUILT_WITH = ""  # the compiler's --version line of the loaded library


def cache_folder() -> Path:
    """Where compiled kernels are kept: `native` in cnnlab's cache ($CNNLAB_CACHE, else ~/.cache/cnnlab)."""
    return cache_dir() / "native"


def compiler() -> str | None:
    """The C compiler to use: $CC, else cc, else gcc on the PATH; None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if os.path.isfile(cc) and os.access(cc, os.X_OK) else None)
    return shutil.which("cc") or shutil.which("gcc")


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    lines = (out.stdout or out.stderr).splitlines()
    return lines[0] if out.returncode == 0 and lines else ""


def _build(cc: str) -> Path:
    """Compile native_kernels.c for this CPU into the cache (once per source, compiler and CPU)."""
    global _BUILT_WITH
    version = _BUILT_WITH = _compiler_version(cc)
    if not version:
        raise RuntimeError(f"{cc} --version failed")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(),
                                     platform.machine().encode(), " ".join(sorted(cpu_flags())).encode()]))
    out = cache_folder() / f"cnnlab_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # then renamed: a concurrent process sees
    os.close(fd)                                                # the whole file or none
    print(f"cnnlab: compiling the native CPU kernels for this CPU into {out.parent} (once per machine)…",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip()[-800:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep a shared cache's build from other users
        os.replace(tmp, out)
        print(f"cnnlab: native kernels compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "pool_stats": [p, i64, i64, i64, i64, p, p, p, i32, i32, i32],
        "pool_affine": [p, p, p, p, i64, i64, i64, i32],
        "pool_grad_sums": [p, p, i64, i64, i64, p, i32],
        "pool_backward": [p, p, p, p, p, p, p, i64, i64, i64, i64, i32],
        "pool_scatter": [p, p, p, p, i64, i64, i64, i64, i32],
        "pool_backward_wgrad": [p, p, p, p, p, p, i64, i64, i64, i64, p, i64, i64, i64, p, i32, i32],
        "conv_pool_wgrad": [p, i64, i64, i64, i64, i64, i64, p, p, p, i64, i64, i64, p, i32],
        "conv_pool_forward": [p, i64, i64, i64, i64, i64, i64, p, p, p, p, i64, i64, i64, i32],
    }
    lib.cnnlab_wgrad_dot.argtypes, lib.cnnlab_wgrad_dot.restype = [], ctypes.c_int
    lib.cnnlab_warp_affine_f32.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, i32]
    lib.cnnlab_warp_affine_f32.restype = ctypes.c_int
    for dtype in ("f32", "bf16"):
        for name, args in signatures.items():
            f = getattr(lib, f"cnnlab_{name}_{dtype}")
            f.argtypes, f.restype = args, ctypes.c_int
    conv_relu = {"conv_relu_forward": [p, i64, i64, i64, i64, p, p, i64, i64, i64, p, i32],
                 "conv_relu_backward": [p, p, p, i64, i64, i64, i64, p, i64, i64, i64, p, p, p, i32]}
    for name, args in conv_relu.items():  # the float32 pair: built everywhere
        f = getattr(lib, f"cnnlab_{name}_f32")
        f.argtypes, f.restype = args, ctypes.c_int
    # built only for CPUs with AVX-512 BF16 (the dot-product instruction): dot_conv_available()
    for name, args in {**conv_relu, "conv_pool_forward_cl": signatures["conv_pool_forward"],
                       "conv_pool_stats": [p, i64, i64, i64, p, p, i64, i64, i64, i64, i64, p, p, p, p, i32]}.items():
        f = getattr(lib, f"cnnlab_{name}_bf16", None)
        if f is not None:
            f.argtypes, f.restype = args, ctypes.c_int


def library() -> ctypes.CDLL | None:
    """The compiled kernels (compiling them on the first call on a machine), or None when they cannot be
    built or loaded here; `why_not()` then says why."""
    global _LIB, _WHY
    if _LIB is not None or _WHY is not None:
        return _LIB
    try:
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler found ($CC, cc, gcc)")
        lib = ctypes.CDLL(str(_build(cc)))
        _declare(lib)
        _LIB = lib
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        _WHY = str(e) or type(e).__name__  # AttributeError: a kernel missing from the library
    return _LIB


def compiler_name() -> str:
    """The first --version line of the compiler the loaded kernels were built with ("" before a load)."""
    return _BUILT_WITH


def why_not() -> str | None:
    """Why the native kernels are not available (None when they are, or were not tried yet)."""
    return _WHY


def reset() -> None:
    """Forget the loaded library's state so the next `library()` looks again (tests)."""
    global _LIB, _WHY, _BUILT_WITH
    _LIB, _WHY, _BUILT_WITH = None, None, ""


DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels compute on `x`: a 4-D float32 or bf16 CPU tensor laid out channels-last
    (NHWC dense), at least 2×2, with the library loaded."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in DTYPES and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


def _pooled_like(y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    n, c, h, w = y.shape
    return torch.empty((n, c, h // 2, w // 2), dtype=dtype or y.dtype, memory_format=torch.channels_last)


def _kernel(name: str, dtype: torch.dtype):
    """The kernel, called so that its status is checked: each returns 1 when its scratch memory could not be
    allocated (then it has left its outputs unfinished), which becomes a MemoryError here; −1 (conv_pool_stats) when
    it refuses its arguments' shapes before touching anything, a ValueError."""
    lib = library()  # loaded (compiled) here when nothing asked for it yet
    if lib is None:
        raise RuntimeError(f"cnnlab's native kernels are not available: {why_not()}")
    f = getattr(lib, f"cnnlab_{name}_{DTYPES[dtype]}")

    def call(*args):
        status = f(*args)
        if status == -1:
            raise ValueError(f"cnnlab's native kernel {name} does not compute these shapes")
        if status != 0:
            raise MemoryError(f"cnnlab's native kernel {name} could not allocate its scratch memory")
    return call


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def pool_stats(y: torch.Tensor, relu: bool, stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(max-pool 2×2 of relu(y) or y, the max's position in each window (uint8), per-channel [sum, sum of
    squares] of relu(y) or y over all of it in float64 when `stats`)."""
    n, c, h, w = y.shape
    pooled, idx = _pooled_like(y), _pooled_like(y, torch.uint8)
    sums = torch.empty(2 * c, dtype=torch.float64) if stats else None
    _kernel("pool_stats", y.dtype)(y.data_ptr(), n, h, w, c, pooled.data_ptr(), idx.data_ptr(),
                                   sums.data_ptr() if stats else None, int(relu), int(stats), torch.get_num_threads())
    return pooled, idx, sums


def _vector(v: torch.Tensor) -> torch.Tensor:
    return v.detach().float().contiguous()


def pool_affine(pooled: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """scale[c]·pooled + shift[c], in pooled's dtype and layout (batch norm's affine after the pool)."""
    n, c, h, w = pooled.shape
    out = torch.empty_like(pooled)
    scale, shift = _vector(scale), _vector(shift)
    _kernel("pool_affine", pooled.dtype)(pooled.data_ptr(), scale.data_ptr(), shift.data_ptr(), out.data_ptr(),
                                         n * h, w * c, c, torch.get_num_threads())
    return out


def pool_grad_sums(g: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, (Σ g, Σ g·pooled) in float64 over the pooled tensor (g laid out as pooled)."""
    n, c, h, w = pooled.shape
    sums = torch.empty(2 * c, dtype=torch.float64)
    g = _cl(g.to(pooled.dtype))  # held in a name: a temporary's memory would be freed before the call
    _kernel("pool_grad_sums", pooled.dtype)(g.data_ptr(), pooled.data_ptr(), n * h, w, c, sums.data_ptr(),
                                            torch.get_num_threads())
    return sums[:c], sums[c:]


def pool_backward(y: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, a: torch.Tensor, k: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    """dy = [y > 0] · (k·y + b + a·g at each window's max): ReLU's, batch norm's and max-pool's backward."""
    n, c, h, w = y.shape
    dy = torch.empty_like(y, memory_format=torch.channels_last)
    g, a, k, b = _cl(g.to(y.dtype)), _vector(a), _vector(k), _vector(b)
    _kernel("pool_backward", y.dtype)(y.data_ptr(), idx.data_ptr(), g.data_ptr(), a.data_ptr(), k.data_ptr(),
                                      b.data_ptr(), dy.data_ptr(), n, h, w, c, torch.get_num_threads())
    return dy


def wgrad_dot_available() -> bool:
    """Whether the library has pool_backward_wgrad's bf16 dot-product products (built where the CPU has
    AVX-512 BF16)."""
    return library() is not None and bool(_LIB.cnnlab_wgrad_dot())


def wgrad_dot_pays(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether pool_backward_wgrad forms a bf16 y's weight gradient in bf16 dot products by default (each sums two
    positions' products; dy and the input rounded to bf16, as torch's bf16 convolution backward rounds them) rather
    than float32 FMAs: on CPUs with AVX-512 BF16 and no AMX, where it was measured faster (the AMD EPYC Zen 4:
    `benchmarks/conv_block_bench.py`, BENCHMARKS.md). Not on AMX CPUs (Intel Xeons), where it is not measured."""
    return _bf16_without_amx(flags)


def conv_pool_stats_available() -> bool:
    """Whether the library has conv_pool_stats (built where the CPU has AVX-512 BF16)."""
    return library() is not None and hasattr(_LIB, "cnnlab_conv_pool_stats_bf16")


def conv_pool_stats_pays(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the first paper's block forward takes conv_pool_stats by default (a bf16 block): on CPUs with
    AVX-512 BF16 and no AMX, where it was measured faster than torch's oneDNN convolution + pool_stats (the AMD EPYC
    Zen 4: `benchmarks/conv_block_bench.py`, BENCHMARKS.md). Not on AMX CPUs (Intel Xeons), where it is not
    measured."""
    return _bf16_without_amx(flags)


def conv_pool_stats_applies(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> bool:
    """Whether conv_pool_stats computes the block for this convolution: one input channel, 16 or 32 output channels,
    stride 1, its output's height even and width a multiple of 4 (no odd edge to pool or count apart), x a 4-D
    float32 or bf16 CPU tensor, the kernel built here."""
    if x.dim() != 4 or weight.dim() != 4:
        return False
    co, ci, kh, kw = weight.shape
    hc, wc = x.shape[2] + 2 * padding[0] - kh + 1, x.shape[3] + 2 * padding[1] - kw + 1
    return (ci == 1 and x.shape[1] == 1 and co in (16, 32) and x.device.type == "cpu" and x.dtype in DTYPES
            and hc >= 2 and hc % 2 == 0 and wc >= 4 and wc % 4 == 0 and conv_pool_stats_available())


def conv_pool_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, pooled, idx, sums) for y = conv2d(x, weight, bias, padding) in bf16 as autocast computes it (x, weight
    and bias rounded to bf16, float sums rounded once), channels-last — and pool_stats(y, relu=True, stats=True)
    from the same pass, y written once and not read back (conv_pool_stats_applies)."""
    if not conv_pool_stats_available():
        raise ValueError("conv_pool_stats is built only for CPUs with AVX-512 BF16 (and a compiler that knows it)")
    if not conv_pool_stats_applies(x, weight, padding):
        raise ValueError(f"conv_pool_stats: a {tuple(weight.shape)} convolution of {tuple(x.shape)} {x.dtype} with "
                         f"padding {tuple(padding)} is not one it computes (conv_pool_stats_applies)")
    n, _, h, w = x.shape
    co, _, kh, kw = weight.shape
    ph, pw = padding
    hc, wc = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    x = x.detach().float().contiguous()  # one channel: NCHW and channels-last are the same memory
    wt, b = weight.detach().float().contiguous(), None if bias is None else bias.detach().float().contiguous()
    y = torch.empty((n, co, hc, wc), dtype=torch.bfloat16, memory_format=torch.channels_last)
    pooled, idx = _pooled_like(y), _pooled_like(y, torch.uint8)
    sums = torch.empty(2 * co, dtype=torch.float64)
    _kernel("conv_pool_stats", torch.bfloat16)(x.data_ptr(), n, h, w, wt.data_ptr(),
                                               None if b is None else b.data_ptr(), co, kh, kw, ph, pw, y.data_ptr(),
                                               pooled.data_ptr(), idx.data_ptr(), sums.data_ptr(),
                                               torch.get_num_threads())
    return y, pooled, idx, sums


def pool_backward_wgrad(y: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, a: torch.Tensor, k: torch.Tensor,
                        b: torch.Tensor, xp: torch.Tensor, kernel_size: tuple[int, int], dot: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight (C, Ci, KH, KW) and bias (C,) gradients, float32, of a stride-1 convolution whose output y
    went through ReLU → batch norm → max-pool: pool_backward's dy, row by row, multiplied straight into the
    weight gradient without dy ever being written. xp: the convolution's input with its zero padding applied,
    (N, Ci, H + KH − 1, W + KW − 1) float32, channels-last (or one channel). `dot`: the products in bf16 dot
    products (dy and xp rounded to bf16; the bias's sums from the unrounded dy) — None: for a bf16 y where
    wgrad_dot_pays and the library has them; True needs wgrad_dot_available()."""
    n, c, h, w = y.shape
    kh, kw = kernel_size
    ci = xp.shape[1]
    if xp.dtype != torch.float32 or tuple(xp.shape) != (n, ci, h + kh - 1, w + kw - 1):
        raise ValueError(f"pool_backward_wgrad: padded input {tuple(xp.shape)} {xp.dtype} does not fit "
                         f"a {kh}×{kw} convolution to {tuple(y.shape)}")
    if dot is None:
        dot = y.dtype == torch.bfloat16 and wgrad_dot_pays() and wgrad_dot_available()
    elif dot and not wgrad_dot_available():
        raise ValueError("pool_backward_wgrad: the bf16 dot products are built only for CPUs with AVX-512 BF16")
    xp = _cl(xp)
    g, a, k, b = _cl(g.to(y.dtype)), _vector(a), _vector(k), _vector(b)
    kk = kh * kw * ci
    dw = torch.empty((kk + 1, c), dtype=torch.float64)
    _kernel("pool_backward_wgrad", y.dtype)(y.data_ptr(), idx.data_ptr(), g.data_ptr(), a.data_ptr(), k.data_ptr(),
                                            b.data_ptr(), n, h, w, c, xp.data_ptr(), ci, kh, kw, dw.data_ptr(),
                                            int(dot), torch.get_num_threads())
    weight = dw[:kk].reshape(kh, kw, ci, c).permute(3, 2, 0, 1).float().contiguous()
    return weight, dw[kk].float()


def pool_scatter(shape: torch.Size, idx: torch.Tensor, g: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The backward of relu(max-pool(y)): g at each window's max where pooled > 0, zero elsewhere (and on the
    odd edges); channels-last, in pooled's dtype."""
    n, c, h, w = shape
    dy = torch.empty((n, c, h, w), dtype=pooled.dtype, memory_format=torch.channels_last)
    g = _cl(g.to(pooled.dtype))
    _kernel("pool_scatter", pooled.dtype)(idx.data_ptr(), g.data_ptr(), pooled.data_ptr(), dy.data_ptr(),
                                          n, h, w, c, torch.get_num_threads())
    return dy


LANES = 16  # native_kernels.c's chunk: conv_pool_wgrad takes a kernel row of KW·Ci ≤ LANES input values
MAX_KERNEL_ROWS = 8


def stem_pays(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the first convolutions whose input needs no gradient take their native kernels by default — the
    second paper's stem (conv_pool_forward, conv_pool_wgrad) and the first paper's convolution before its
    ReLU → batch norm → max-pool (pool_backward_wgrad): with AVX-512 or AVX2, where they were measured faster
    than torch's convolution with the native block — on a Zen 3 with AVX2 only, the second net's stem forward
    3.96 against 6.09 ms a batch, its weight gradient 1.79 against 13.7, cnnlab's loop on the second net 1.41×
    faster (`benchmarks/stem_bench.py`) and on the first net 1.20× (`benchmarks/conv_block_bench.py`;
    BENCHMARKS.md). Off on other CPUs (older x86, ARM), where they are not measured; the native blocks run there
    either way."""
    return bool({"avx512f", "avx2"} & set(cpu_flags() if flags is None else flags))


def stem_forward_pays(dtype: torch.dtype, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the second paper's stem computes its forward in one native pass (conv_pool_forward) by default, or
    through torch's convolution and the native pool (its backward, conv_pool_wgrad, is native either way): where
    stem_pays, except in bf16 on a CPU with AMX, whose tile unit torch's oneDNN convolution uses — on an Intel
    Xeon with AVX-512 BF16 + AMX that forward took 3.06–3.20 against the one pass's 3.59–3.78 ms a batch, and
    cnnlab's loop ran 0.93–0.95× as fast with the one pass (two runs of `benchmarks/stem_bench.py`, with the
    kernel before conv_pool_forward_cl_bf16: not yet re-measured with it on an AMX CPU); on the AMD EPYC Zen 4
    with AVX-512 BF16 and no AMX the channels-last one pass was 2.18 (1.66) against 3.31 (3.55) ms, the loop
    1.09× in two runs (BENCHMARKS.md)."""
    if flags is None:  # AMX counts where torch's oneDNN may use it (hardware.usable_flags)
        return stem_pays() and not (dtype == torch.bfloat16 and "amx_bf16" in usable_flags())
    flags = set(flags)
    return stem_pays(flags) and not (dtype == torch.bfloat16 and "amx_bf16" in flags)


def conv_pool_wgrad_applies(x: torch.Tensor, kernel_size: tuple[int, int]) -> bool:
    """Whether conv_pool_wgrad computes for a stride-1 unpadded convolution of `x` with this kernel: a 4-D
    float32 CPU input in NHWC order (channels-last, or one channel), KH ≤ 8, KW·Ci ≤ 16, the library loaded."""
    kh, kw = kernel_size
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and kh <= MAX_KERNEL_ROWS
            and kw * x.shape[1] <= LANES and x.shape[2] - kh + 1 >= 2 and x.shape[3] - kw + 1 >= 2
            and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


def conv_pool_wgrad(x: torch.Tensor, kernel_size: tuple[int, int], idx: torch.Tensor, g: torch.Tensor,
                    pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights' (C, Ci, KH, KW) and bias's (C,) gradients, float32, of relu(max-pool 2×2(conv(x))) for
    a stride-1 unpadded convolution, from the pooled output's gradient `g`, the pooled values and their window
    positions (pool_stats): only the windows' maxima contribute (conv_pool_wgrad_applies says when it runs)."""
    n, ci, hx, wx = x.shape
    kh, kw = kernel_size
    _, c, ho, wo = pooled.shape
    dw = torch.empty((c, kh + 1, LANES), dtype=torch.float64)
    g = _cl(g.to(pooled.dtype))
    _kernel("conv_pool_wgrad", pooled.dtype)(x.data_ptr(), n, hx, wx, ci, kh, kw, pooled.data_ptr(), idx.data_ptr(),
                                             g.data_ptr(), ho, wo, c, dw.data_ptr(), torch.get_num_threads())
    weight = dw[:, :kh, :kw * ci].reshape(c, kh, kw, ci).permute(0, 3, 1, 2).float()
    return weight, dw[:, kh, 0].float()


def conv_pool_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu(max-pool 2×2(conv(x) + bias)), the max's window positions) for a stride-1 unpadded convolution, as
    pool_stats(relu=True) gives them from torch's convolution output in `dtype` — for bf16, x, weight and bias
    rounded to bf16 first and the output rounded after, as under autocast — without writing that output; the
    sums in float, in the kernel's own order (so a float32 output may differ from torch's in its last bits, a
    bf16 one by a rounding step where a sum lies on a rounding boundary), and where a window is all ≤ 0 its
    position may differ from pool_stats' (its pooled value is 0 and gets no gradient). For the convolutions
    conv_pool_wgrad_applies to (KW·Ci ≤ 16, KH ≤ 8). In bf16 on a CPU with AVX-512 BF16 a float32 x is read in its
    channels-last order (copied into it if it is not) and rounded by the kernel with vcvtneps2bf16, which flushes
    subnormal floats to zero (torch rounds the largest up to 2^-126); elsewhere x is copied into channel planes in
    the convolution's dtype first."""
    n, ci, hx, wx = x.shape
    c, _, kh, kw = weight.shape
    ho, wo = (hx - kh + 1) // 2, (wx - kw + 1) // 2

    def prepared(t):  # float32, rounded through bf16 where the convolution computes in it
        t = t.detach()
        return (t.to(torch.bfloat16) if dtype == torch.bfloat16 else t).float()
    wt = prepared(weight).permute(1, 2, 3, 0).contiguous()  # (Ci, KH, KW, C)
    b = prepared(bias).contiguous() if bias is not None else torch.zeros(c)
    pooled = torch.empty((n, c, ho, wo), dtype=dtype, memory_format=torch.channels_last)
    idx = torch.empty((n, c, ho, wo), dtype=torch.uint8, memory_format=torch.channels_last)
    if (dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            and hasattr(_LIB, "cnnlab_conv_pool_forward_cl_bf16")):
        x = _cl(x.detach().float())  # AVX-512 BF16: x read as the loop gives it, no copies (bf16: exact in float)
        _kernel("conv_pool_forward_cl", dtype)(x.data_ptr(), n, hx, wx, ci, kh, kw, wt.data_ptr(), b.data_ptr(),
                                               pooled.data_ptr(), idx.data_ptr(), ho, wo, c, torch.get_num_threads())
        return pooled, idx
    planes = torch.empty(x.numel() + 2 * LANES + kw, dtype=dtype)  # NCHW, with room for a chunk's read past it
    planes[:x.numel()].view(x.shape).copy_(x.detach().to(dtype))  # the cast first: a mixed-dtype transposing
                                                                   # copy_ took 2.5× as long
    _kernel("conv_pool_forward", dtype)(planes.data_ptr(), n, hx, wx, ci, kh, kw, wt.data_ptr(), b.data_ptr(),
                                        pooled.data_ptr(), idx.data_ptr(), ho, wo, c, torch.get_num_threads())
    return pooled, idx


# the channel counts conv_relu_forward/backward are taken for: a register block of them (24 output channels forward,
# 12 input channels in the input gradient), and where dot_conv_bench measured them clearly faster than oneDNN (at 16
# → 32 channels about even, at 32 → 64 slower)
DOT_CONV_MAX_IN, DOT_CONV_MAX_OUT = 12, 24
# the float32 pair's: where dot_conv_bench measured it faster than oneDNN's fp32 kernels (conv_relu_shape)
F32_CONV_MAX_IN, F32_CONV_OUT, F32_CONV_MIN_WIDTH = 10, (20, 24), 16


def dot_conv_available() -> bool:
    """Whether the library has the bf16 dot-product convolution (built where the CPU has AVX-512 BF16)."""
    return library() is not None and hasattr(_LIB, "cnnlab_conv_relu_forward_bf16")


def dot_conv_pays(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether a few-channel convolution followed by ReLU (the second paper's 10 → 20-channel 5×5 one) runs in bf16
    through conv_relu_forward/backward by default: on CPUs with AVX-512 BF16 and no AMX. Measured on an AMD EPYC
    Zen 4 (AVX-512 BF16, no AMX) against torch's oneDNN bf16 channels-last convolution with ReLU (and the copies
    to and from the dense layer's (C, H, W) order it needs): that convolution 1.50× as fast, forward and backward
    together (1.36× and 1.57×), 1.10–2.46× on five other shapes with ≤ 12 input and ≤ 24 output channels, 0.97×
    at 16 → 32 and 0.78× at 32 → 64 channels (`benchmarks/dot_conv_bench.py`, BENCHMARKS.md). Where the CPU has
    AMX torch's oneDNN uses its tile unit, which this kernel was not measured against: torch's convolution stays
    there."""
    return _bf16_without_amx(flags)


def _bf16_without_amx(flags: frozenset[str] | set[str] | None) -> bool:
    """AVX-512 BF16 and no AMX: where the bf16 dot-product kernels were measured faster (dot_conv_pays,
    wgrad_dot_pays, conv_pool_stats_pays). AMX counts where torch's oneDNN may use it (hardware.usable_flags)."""
    if flags is None:
        return "avx512_bf16" in cpu_flags() and "amx_bf16" not in usable_flags()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def f32_conv_pays(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether a few-channel convolution followed by ReLU (the second paper's 10 → 20-channel 5×5 one) runs in
    float32 through conv_relu_forward/backward by default: on CPUs with AVX2 and no AVX-512, where
    `benchmarks/dot_conv_bench.py` measured it against torch's oneDNN fp32 channels-last convolution with ReLU (and
    the copies to and from the dense layer's (C, H, W) order) on an AMD EPYC Zen 3 (BENCHMARKS.md). With AVX-512
    it was not measured in float32 (those CPUs met so far had BF16 and train in bf16 by default): torch's
    convolution stays there unless `_NativeConvReLU.enabled` says otherwise."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and "avx512f" not in flags


def conv_relu_shape(ci: int, co: int, width: int, dtype: torch.dtype) -> bool:
    """Whether conv_relu_forward/backward are taken for these channel counts and output width in `dtype`: in bf16
    ≤ DOT_CONV_MAX_IN input and ≤ DOT_CONV_MAX_OUT output channels; in float32 ≤ F32_CONV_MAX_IN input, F32_CONV_OUT
    output channels and rows of ≥ F32_CONV_MIN_WIDTH output columns — where dot_conv_bench measured the float32 pair
    faster than oneDNN's fp32 kernels on an AVX2 Zen 3, forward and backward together (BENCHMARKS.md's AVX2
    section): the second paper's layer and shapes like it (its 10 → 20 with rows of 17–57 columns 1.16–1.59×,
    10 → 24 1.21×; with rows of 9 columns, two 8-lane chunks 56 % filled, 1.01×; 8 → 8, 6 → 16, 12 → 24 and
    16 → 20, whose channels fill oneDNN's 8-lane blocks better, 0.81–0.99×). Other shapes stay with oneDNN even
    where one was measured faster (3 → 16, 3×3, 1.81×): the rule covers what was decided on, not every shape
    that wins."""
    if dtype == torch.bfloat16:
        return ci <= DOT_CONV_MAX_IN and co <= DOT_CONV_MAX_OUT
    return (dtype == torch.float32 and ci <= F32_CONV_MAX_IN and F32_CONV_OUT[0] <= co <= F32_CONV_OUT[1]
            and width >= F32_CONV_MIN_WIDTH)


def conv_relu_applies(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether conv_relu_forward computes relu(conv2d(x, weight)) in `dtype` (bf16 or float32) for a stride-1
    unpadded convolution of the shape it is taken for (conv_relu_shape), x a 4-D float32 or bf16 CPU tensor at
    least the kernel's size, the kernels built here (bf16: the dot-product ones, AVX-512 BF16)."""
    co, ci, kh, kw = weight.shape
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in DTYPES and x.shape[1] == ci
            and x.shape[2] >= kh and x.shape[3] >= kw and conv_relu_shape(ci, co, x.shape[3] - kw + 1, dtype)
            and (dot_conv_available() if dtype == torch.bfloat16 else library() is not None))


def conv_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """relu(conv2d(x, weight, bias)) in `dtype`, (N, Co, Ho, Wo) in plain NCHW order — the order a dense layer
    after it reads — for a stride-1 unpadded convolution (conv_relu_applies). bf16 as autocast computes it (x,
    weight and bias rounded to bf16, float sums rounded once); float32 in float sums."""
    n, ci, h, w = x.shape
    co, _, kh, kw = weight.shape
    x = _cl(x.detach().to(dtype))
    wt, b = weight.detach().float().contiguous(), None if bias is None else bias.detach().float().contiguous()
    y = torch.empty((n, co, h - kh + 1, w - kw + 1), dtype=dtype)
    _kernel("conv_relu_forward", dtype)(x.data_ptr(), n, h, w, ci, wt.data_ptr(), None if b is None else b.data_ptr(),
                                        co, kh, kw, y.data_ptr(), torch.get_num_threads())
    return y


def conv_relu_backward(g: torch.Tensor, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                       bias_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(x's gradient channels-last in y's dtype or None, the weights' (Co, Ci, KH, KW) and the bias's gradients in
    float32) of conv_relu_forward's y = relu(conv2d(x, weight, bias)), from y's gradient g: ReLU's mask from y,
    the input gradient as a convolution of the padded gradient with the flipped weights, the weight gradient
    summed in float over each thread's images (its vector lanes and the threads' parts then in double)."""
    n, ci, h, w = x.shape
    co, _, kh, kw = weight.shape
    dtype = y.dtype
    x = _cl(x.detach().to(dtype))
    g = g.to(dtype).contiguous()
    wt = weight.detach().float().contiguous()
    dx = torch.empty((n, ci, h, w), dtype=dtype, memory_format=torch.channels_last) if input_grad else None
    dw = torch.empty((co, ci, kh, kw), dtype=torch.float32)
    db = torch.empty(co, dtype=torch.float32) if bias_grad else None
    _kernel("conv_relu_backward", dtype)(g.data_ptr(), y.data_ptr(), x.data_ptr(), n, h, w, ci, wt.data_ptr(), co,
                                         kh, kw, None if dx is None else dx.data_ptr(), dw.data_ptr(),
                                         None if db is None else db.data_ptr(), torch.get_num_threads())
    return dx, dw, db


def warp_applies(x: torch.Tensor) -> bool:
    """Whether warp_affine computes on `x`: a 4-D float32 CPU batch (any layout) of at least one pixel whose
    offsets within an image fit the kernel's 32-bit integers, with the library loaded."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and x.numel() > 0
            and x.stride(2) * (x.shape[2] - 1) + x.stride(3) * (x.shape[3] - 1) < 2 ** 31 - 1
            and library() is not None)


def warp_affine(x: torch.Tensor, draws: torch.Tensor, rotation: float, scale: float, translate: float,
                hflip: float) -> torch.Tensor:
    """Batch augmentation's flip and affine warp in one pass (data/augment.py's augment_batch, whose random
    draws these are): draws (5, N) float32 uniform in [0, 1) — flip (unused when hflip is 0), angle, zoom,
    x shift, y shift; rotation in radians. The same bilinear, border-padded sampling as F.grid_sample with
    align_corners=False, θ formed in the kernel; the output in x's memory format. The work is split over the
    images (a batch of one runs on one thread)."""
    if not warp_applies(x):
        raise ValueError(f"warp_affine computes on a non-empty 4-D float32 CPU batch with the native kernels loaded, "
                         f"not {x.dtype} {tuple(x.shape)} on {x.device}")
    draws = draws.contiguous()
    if tuple(draws.shape) != (5, x.shape[0]) or draws.dtype != torch.float32 or draws.device.type != "cpu":
        raise ValueError(f"warp_affine: draws must be float32 (5, {x.shape[0]}) on the CPU, not "
                         f"{draws.dtype} {tuple(draws.shape)} on {draws.device}")
    out = torch.empty_like(x)
    strides = [(ctypes.c_int64 * 4)(*t.stride()) for t in (x, out)]
    bounds = (ctypes.c_float * 4)(rotation, scale, translate, hflip)
    status = _LIB.cnnlab_warp_affine_f32(x.data_ptr(), *x.shape, strides[0], draws.data_ptr(), bounds,
                                         out.data_ptr(), strides[1], torch.get_num_threads())
    if status != 0:
        raise MemoryError("cnnlab's native kernel warp_affine could not allocate its scratch memory")
    return out
