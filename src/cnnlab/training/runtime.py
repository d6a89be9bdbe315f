"""Device, precision and threads as one small object (Lightning Fabric-style), not `if`s in the loop."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


class Runtime:
    """Where and how tensors compute.

    device: auto | cpu | cuda | cuda:N.  precision: "32" | "bf16-mixed" | "16-mixed" (CUDA).
    channels_last: None picks the measured default for the device.
    """

    def __init__(self, device: str = "auto", precision: str = "32", threads: int | None = None,
                 channels_last: bool | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device} but no CUDA device is available; use train.device=cpu")
        self.device = torch.device(device)
        if precision == "16-mixed" and self.device.type != "cuda":
            raise RuntimeError("train.precision=16-mixed needs CUDA; on the CPU use bf16-mixed or 32")
        self.precision = precision
        # channels-last measured 20–36 % faster on the CPU (benchmarks/switches_bench.py, BENCHMARKS.md);
        # unmeasured on CUDA, so off there unless asked for
        self.channels_last = channels_last if channels_last is not None else self.device.type == "cpu"
        if self.device.type == "cpu":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(threads or cores or 1)
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
             "channels_last": self.channels_last}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs: dropout and init draw from these."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
