"""Device, precision and threads as one small object (Lightning Fabric-style), not `if`s in the loop."""

from __future__ import annotations

import contextlib
import ctypes
import random
import sys

import numpy as np
import torch

from ..hardware import cpu_cores


MAX_THREADS_PER_CORE = 4  # more only adds switching; far more crashes the OpenMP runtime


class Runtime:
    """Where and how tensors compute.

    device: auto | cpu | cuda | cuda:N.  precision: "32" | "bf16-mixed" | "16-mixed" (CUDA).
    channels_last, fused, reuse_memory: None picks the measured default for the device (on for the CPU).
    fused: the optimiser's fused step and the models' fused ReLU → batch-norm → max-pool blocks.
    reuse_memory: `keep_freed_memory()` for this process.
    """

    def __init__(self, device: str = "auto", precision: str = "32", threads: int | None = None,
                 channels_last: bool | None = None, fused: bool | None = None, reuse_memory: bool | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device} but no CUDA device is available; use train.device=cpu")
        self.device = torch.device(device)
        if precision == "16-mixed" and self.device.type != "cuda":
            raise RuntimeError("train.precision=16-mixed needs CUDA; on the CPU use bf16-mixed or 32")
        self.precision = precision
        # None: on where measured faster, the CPU (channels-last 12–54 %, the fused kernels and kept memory:
        # benchmarks/switches_bench.py, BENCHMARKS.md); unmeasured on CUDA, so off there unless asked for
        cpu = self.device.type == "cpu"
        self.channels_last, self.fused, reuse_memory = (cpu if v is None else v
                                                        for v in (channels_last, fused, reuse_memory))
        self.reuse_memory = reuse_memory and keep_freed_memory()
        if cpu:
            cores = cpu_cores()
            if threads is not None and threads > MAX_THREADS_PER_CORE * cores:  # OpenMP segfaults at ~100,000
                raise ValueError(f"train.threads={threads}: at most {MAX_THREADS_PER_CORE} per core, "
                                 f"{MAX_THREADS_PER_CORE * cores} on the {cores} core(s) here (null: one per core)")
            torch.set_num_threads(threads or cores)
        self.threads = torch.get_num_threads()

    def autocast(self):
        """Mixed-precision context for forward + loss; a no-op at "32"."""
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self):
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler("cuda") if self.precision == "16-mixed" else None

    def describe(self) -> dict:
        d = {"device": str(self.device), "precision": self.precision, "threads": self.threads,
             "channels_last": self.channels_last, "fused": self.fused, "reuse_memory": self.reuse_memory}
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs: dropout and init draw from these."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
