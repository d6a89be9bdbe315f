"""Device, precision and threads as small objects (Lightning Fabric-style), not `if`s in the loop."""

from __future__ import annotations

import contextlib
import ctypes
import random
import sys
import weakref

import numpy as np
import torch

from ..hardware import capability, cpu_cores, cpu_flags, native_bf16, physical_cores, torch_limits, usable_flags


MAX_THREADS_PER_CORE = 4  # more only adds switching; far more crashes the OpenMP runtime


class Precision:
    """How a training step computes: "32" | "bf16-mixed" | "16-mixed" — autocast for forward and loss, and
    for fp16 the loss scaler, owned here for the whole run (Lightning Fabric's precision plugin, reduced).

    The loop only calls backward / unscale_ / step: no branches on the scaler. One object lives for the
    run, so the loss scale carries over epochs, and `state_dict` puts it into every checkpoint.
    scaler: a GradScaler to use instead of the default (None for 32 and bf16; tests force one on the CPU).
    """

    def __init__(self, name: str = "32", device: torch.device | str = "cpu", scaler=None):
        self.name, self.device_type = name, torch.device(device).type
        if scaler is None and name == "16-mixed":
            scaler = torch.amp.GradScaler(self.device_type)
        self.scaler = scaler

    def __str__(self) -> str:
        return self.name

    def autocast(self):
        """Mixed-precision context for forward + loss; a no-op at "32"."""
        if self.name == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.name == "bf16-mixed" else torch.float16)

    @property
    def skips_overflow(self) -> bool:
        """Whether a non-finite gradient is the scaler's business (it skips that step and lowers the scale)
        rather than a sign of divergence."""
        return self.scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients in true units, before clipping or measuring them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def auto_precision(device: torch.device, flags=None) -> tuple[str, str]:
    """train.precision=auto: (the precision, why). bf16-mixed where bf16 is computed in hardware — a CPU with
    AVX-512 BF16 or AMX, a CUDA device that supports it — fp32 elsewhere (on an AVX2 CPU bf16 is emulated:
    measured 9–20× slower)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return "32", "this GPU has no native bf16"
    kind = capability(flags)
    if flags is None:  # this machine: what torch may use of it (ONEDNN_MAX_CPU_ISA can hold it below the chip)
        dropped, limit = torch_limits()
        if limit and native_bf16(cpu_flags()) and not native_bf16():
            return "32", (f"the CPU has {kind}, but {limit} holds torch's oneDNN below its bf16 units: bf16 would "
                          "be emulated (a 512² bf16 product measured 600× slower than with them)")
        if limit and dropped & cpu_flags():
            kind = f"{kind} ({limit}: {capability(usable_flags())} for torch)"
        flags = usable_flags()
    if native_bf16(flags):
        return "bf16-mixed", f"the CPU has {kind}: bf16 in hardware (faster than fp32 there)"
    return "32", f"the CPU has {kind}, no AVX-512 BF16 / AMX: bf16 would be emulated (measured 9–20× slower)"


def _cannot_build(why: str) -> RuntimeError:
    return RuntimeError(f"train.native=true but the native kernels cannot be built here: {why} "
                        "(train.native=null takes the torch-op path instead)")


class Runtime:
    """Where and how tensors compute.

    device: auto | cpu | cuda | cuda:N.  precision: "32" | "bf16-mixed" | "16-mixed" (CUDA).
    channels_last, fused, reuse_memory: None picks the measured default for the device (on for the CPU).
    fused: the optimiser's fused step and the models' fused ReLU → batch-norm → max-pool blocks.
    reuse_memory: `keep_freed_memory()` for this process.
    native: the fused blocks through cnnlab's compiled kernels (models/native.py): None on the CPU where they
    build (compiled here, once per machine), True required (an error where they cannot be built, and on CUDA),
    False off; the same setting decides batch augmentation's warp (native_warp), which can use the kernels where
    the blocks do not (`native` False, its reason saying so).
    """

    def __init__(self, device: str = "auto", precision: str = "32", threads: int | None = None,
                 channels_last: bool | None = None, fused: bool | None = None, reuse_memory: bool | None = None,
                 native: bool | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device} but no CUDA device is available; use train.device=cpu")
        self.device = torch.device(device)
        if precision == "16-mixed" and self.device.type != "cuda":
            raise RuntimeError("train.precision=16-mixed needs CUDA; on the CPU use bf16-mixed or 32")
        cpu = self.device.type == "cpu"
        if native and not cpu:  # for the blocks and the batch augmentation's warp alike, fused or not
            raise RuntimeError("train.native=true: the native kernels are CPU kernels; use train.native=null "
                               "or false on CUDA")
        self.reasons: dict[str, str] = {}  # why each default was taken (env.json records it)
        if precision == "auto":
            precision, self.reasons["precision"] = auto_precision(self.device)
        self.precision = Precision(precision, self.device)
        # None: on where measured faster, the CPU (channels-last 0–81 %, the fused kernels and kept memory:
        # benchmarks/switches_bench.py, BENCHMARKS.md); unmeasured on CUDA, so off there unless asked for
        for key, value in (("channels_last", channels_last), ("fused", fused), ("reuse_memory", reuse_memory)):
            if value is None:
                self.reasons[key] = ("on for the CPU, where it measured faster (BENCHMARKS.md)" if cpu else
                                     "off on CUDA, where it is not measured")
        self.channels_last, self.fused, reuse_memory = (cpu if v is None else v
                                                        for v in (channels_last, fused, reuse_memory))
        self.reuse_memory = reuse_memory and keep_freed_memory()
        # on the CPU by default, decided by native_for(model): only a model with fused blocks waits for the compile
        # for them (and any model whose batches are warped, for the warp: native_warp)
        self.native: bool | None = False
        self._native_setting = native  # train.native as given: native_warp's question
        self._blocks_off = "train.fused=false"  # why the blocks' kernels are off, once they are (native_warp says it)
        self.feature_engine: str | None = None  # head-only runs: what computed the backbone's features (features.py)
        if self.fused:
            self.native = None if native is None and cpu else self._native(native, cpu)
        if not self.fused and native is None:
            self.reasons["native"] = "off with the fused blocks (train.fused=false)"
        if cpu:
            cores = cpu_cores()
            if threads is not None and threads > MAX_THREADS_PER_CORE * cores:  # OpenMP segfaults at ~100,000
                raise ValueError(f"train.threads={threads}: at most {MAX_THREADS_PER_CORE} per core, "
                                 f"{MAX_THREADS_PER_CORE * cores} on the {cores} logical CPU(s) here "
                                 "(null: one per logical CPU)")
            torch.set_num_threads(threads or cores)
            if threads is None:
                physical = physical_cores()
                smt = ("" if physical is None or physical >= cores else
                       f"; SMT threads of {physical} physical cores — torch's own default counts physical "
                       "cores only; not measured on such a CPU: set train.threads to compare")
                self.reasons["threads"] = f"one per logical CPU this process may use ({cores}){smt}"
        self.threads = torch.get_num_threads()

    def native_for(self, model: torch.nn.Module, fused: bool = True) -> bool:
        """Whether `model`'s fused blocks run through the compiled kernels, deciding it on the first call
        where the default left it open: compiled (once per machine) only for a model that has fused blocks
        — the papers' nets —, not for one without (the pretrained backbones) nor one whose blocks are not
        fused here (`fused=False`: torch.compile fuses by itself)."""
        from ..models.fused import FusedSequential

        if self.native is None:
            if not fused:
                self.native, self._blocks_off = False, "the blocks are not fused (train.compile fuses by itself)"
                self.reasons["native"] = f"off: {self._blocks_off}"
            elif not any(isinstance(m, FusedSequential) for m in model.modules()):
                self.native, self._blocks_off = False, "the model has no fused conv blocks"
                self.reasons["native"] = f"off: {self._blocks_off} (not compiled)"
            else:
                self.native = self._native(None, True)
        return self.native

    def native_warp(self, warps: bool = True) -> bool:
        """Whether batch augmentation's flip and affine warp runs through the compiled kernel (data/augment.py,
        `benchmarks/augment_bench.py`): on the CPU wherever train.native is not false and the kernels build here,
        for any model — one without fused blocks, or under train.compile or train.fused=false, has them compiled
        for the warp alone (once per machine), and `native`'s reason says so. warps: False when the batches are
        only flipped (torch's one op). The reason goes into env.json as `augment`."""
        from ..models import native

        torch_ops = "flip and warp through torch's ops"
        if not warps:
            why, on = "flips only, through torch's flip (no warp to run)", False
        elif self.device.type != "cpu":
            why, on = f"{torch_ops} (the native kernels are CPU kernels)", False
        elif self._native_setting is False:
            why, on = f"{torch_ops} (train.native=false)", False
        elif not self.native and native.library() is None:
            if self._native_setting:
                raise _cannot_build(native.why_not())
            why, on = f"{torch_ops}: {native.why_not()}", False
        else:
            why, on = "flip and affine warp of the training batches in one pass of the compiled kernel", True
            if not self.native:  # the blocks' kernels are off: the library serves the warp alone
                self.reasons["native"] = (f"off for the blocks: {self._blocks_off}; compiled for the batch "
                                          "augmentation's warp alone")
        self.reasons["augment"] = why
        return on

    def _native(self, wanted: bool | None, cpu: bool) -> bool:
        """Whether the fused blocks run through the compiled kernels (compiling them now if need be)."""
        from ..models import native

        if wanted is False:
            return False
        if not cpu:  # train.native=true on CUDA was refused in __init__
            self.reasons["native"] = "off on CUDA: CPU kernels"
            return False
        if native.library() is None:
            if wanted:
                raise _cannot_build(native.why_not())
            self.reasons["native"] = f"off: {native.why_not()}; the fused blocks use torch's ops"
            return False
        if wanted is None:
            bf16 = str(self.precision).startswith("bf16")
            if not native.stem_pays():
                stem = "; the stem kernels off (the first convolutions': measured only on CPUs with AVX2 or AVX-512)"
            elif bf16 and not native.stem_forward_pays(torch.bfloat16):
                stem = ("; the second paper's stem forward through torch's convolution (oneDNN's AMX kernels, "
                        "measured faster in bf16)")
            else:
                stem = ""
            if bf16 and native.dot_conv_pays() and native.dot_conv_available():
                stem += ("; where a few-channel convolution + ReLU ends the conv block (the second paper's 10 → 20), "
                         "the bf16 dot-product kernel (AVX-512 BF16, no AMX)")
            if not bf16 and native.f32_conv_pays():
                stem += ("; where a few-channel convolution + ReLU ends the conv block (the second paper's 10 → 20), "
                         "the float32 kernel with output columns as its lanes (AVX2 without AVX-512)")
            if bf16 and native.stem_pays() and native.wgrad_dot_pays() and native.wgrad_dot_available():
                stem += ("; the first convolution's weight gradient before ReLU → batch norm → max-pool (the first "
                         "paper's) in bf16 dot products (AVX-512 BF16, no AMX)")
            if bf16 and native.stem_pays() and native.conv_pool_stats_pays() and native.conv_pool_stats_available():
                stem += ("; a 1-channel convolution before ReLU → batch norm → max-pool (the first paper's), with the "
                         "pool and the statistics, in one bf16 dot-product pass (AVX-512 BF16, no AMX)")
            self.reasons["native"] = f"on: compiled for this CPU with {native.compiler_name()}{stem}"
        return True

    def autocast(self):
        """Mixed-precision context for forward + loss (the precision's)."""
        return self.precision.autocast()

    def describe(self) -> dict:
        d = {"device": str(self.device), "precision": str(self.precision), "threads": self.threads,
             "channels_last": self.channels_last, "fused": self.fused, "reuse_memory": self.reuse_memory,
             "native": self.native, **({"feature_engine": self.feature_engine} if self.feature_engine else {}),
             "cpu_kind": capability(), "defaults_because": dict(self.reasons)}
        if torch_limits()[1]:  # the chip's kind, and the one torch's oneDNN was held to
            d["torch_cpu_limit"] = f"{torch_limits()[1]}: {capability(usable_flags())}"
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d


_KEPT = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed tensor memory in the process instead of handing it back to the OS.

    By default glibc serves big blocks (the activations of a training step, megabytes each) with fresh
    mmap()s and trims freed heap memory, so steps fault activation pages in again: ~4,600 page faults
    per step of the first paper's net. Serving blocks up to 32 MiB from the heap and trimming only
    beyond 256 MiB free removes them (measured 13 % faster without the fused kernels, 1–8 % with them,
    `benchmarks/switches_bench.py`; blocks over 32 MiB, glibc's limit, are still mapped afresh; the
    price is that up to 256 MiB of freed memory stays counted in the process's RSS). The setting is
    process-wide and stays. Returns whether it is in effect (False off glibc).
    """
    global _KEPT
    if _KEPT or not sys.platform.startswith("linux"):
        return _KEPT
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>; 32 MiB is its largest mmap threshold
    _KEPT = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
    return _KEPT


MMAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold: bigger blocks are always fresh mmap()s
_CHUNKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {(input shape, dtype, precision): n}


def inference_chunk(model: torch.nn.Module, x: torch.Tensor, runtime: "Runtime",
                    limit: int = MMAP_THRESHOLD) -> int:
    """Images per forward pass for inference on the CPU: the most whose largest activation stays under
    glibc's 32 MiB mmap threshold (at most len(x)).

    A block over it is a fresh mmap() on every allocation and its pages fault in again on every pass
    (EfficientNet-Lite0 features at 224 px on 2 AVX-512 BF16 cores, `benchmarks/cpu_kernels_bench.py`: fp32
    55 images/s in passes of 32 against ~100 in passes of 6 or 8; bf16 168 at 32, 90 at 64, ~180 at 12). Measured
    once per model, input shape and precision by one image through the model with hooks on its layers;
    small inputs (the papers' nets) keep their whole batch. On CUDA: len(x)."""
    if runtime.device.type != "cpu" or len(x) <= 1:
        return len(x)
    key = (tuple(x.shape[1:]), x.dtype, str(runtime.precision))
    known = _CHUNKS.setdefault(model, {})
    if key not in known:
        biggest = 0

        def hook(_module, _inputs, out):
            nonlocal biggest
            if isinstance(out, torch.Tensor):
                biggest = max(biggest, out.numel() * out.element_size())

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad(), runtime.autocast():
                model(x[:1])
        finally:
            for h in handles:
                h.remove()
        # functional steps between layers (padding, activations) make blocks a little larger than a layer's output
        known[key] = max(1, int(0.9 * limit) // max(biggest, 1))
    return max(1, min(len(x), known[key]))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs: dropout and init draw from these."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
