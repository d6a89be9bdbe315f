"""Batches streamed from the memory-mapped decode cache, for data that does not fit the memory budget.

The in-memory path (loader.DeviceLoader) copies each split into one uint8 tensor on the device.
When that would exceed the budget, StreamingLoader reads every batch from the cache by index
instead: the batch's rows are sorted (the file is read forwards), gathered, then put back in
the batch's order — so for the same seed it yields exactly the batches DeviceLoader yields.
The next batch is gathered in a background thread while the current one is used, and pages
already read are dropped from the process' resident set (they stay in the OS page cache),
so peak RSS stays bounded however large the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .images import DataError
from .dataset import Dataset
from .folder import page_releaser, release_pages  # noqa: F401  (release_pages: part of this module's API)
from .loader import DeviceLoader, Prepared, seeded_generators
from .normalize import Normalizer, fit_normalizer
from .split import Split

DEFAULT_BUDGET_FRACTION = 0.5  # of the memory available now: room left for the model, activations, the OS
FALLBACK_BUDGET = 2 << 30      # bytes, when available memory cannot be read


# --------------------------------------------------------------------------- memory budget

def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_available() -> int | None:
    """Room left under a container's memory limit (cgroup v2), if there is one."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes of RAM available now (MemAvailable, or os.sysconf), within a container's limit."""
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def default_memory_budget(device: str | torch.device | None = None, fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """Bytes the decoded data may take resident: a fraction of the available RAM (and, for a CUDA
    device, of its free memory, since the in-memory path keeps the splits there)."""
    avail = available_memory()
    budget = int(fraction * avail) if avail is not None else FALLBACK_BUDGET
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = min(budget, int(fraction * free))
    return budget


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(value: float | str) -> int:
    """A memory size: 1500000000, "1.5GB", "800 MiB", "512m" (binary units), or "30%" of available RAM."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"memory size must be ≥ 0, got {value}")
        return int(value)
    text = str(value).strip().lower().replace("_", "").replace(",", "")
    if text.endswith("%"):
        frac = float(text[:-1]) / 100
        if not 0 < frac <= 1:
            raise ValueError(f"memory size {value!r}: a percentage must be in (0, 100]")
        return default_memory_budget(fraction=frac)
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(num):].strip()
    try:
        number = float(num)
    except ValueError:
        number = -1.0
    if unit not in _UNITS or number < 0:
        raise ValueError(f"memory size {value!r}: expected a number ≥ 0 with an optional unit "
                         "(B, KB, MB, GB, TB; binary) or a percentage such as 40%")
    return int(number * _UNITS[unit])


def fits_in_memory(n_images: int, c: int, h: int, w: int, budget_bytes: int | None = None) -> bool:
    """Whether n uint8 images of (c, h, w) — the in-memory loaders' resident data — fit the budget."""
    budget = default_memory_budget() if budget_bytes is None else budget_bytes
    return n_images * c * h * w <= budget


# --------------------------------------------------------------------------- loader

class StreamingLoader(DeviceLoader):
    """Yields (x float (B,C,H,W), y int64 (B,)) batches read from `images` rows by index.

    Same interface and same batches as loader.DeviceLoader for the same generator state, but
    `images` is the whole (N, C, H, W) uint8 CPU tensor (normally a view of the memory-mapped
    cache) and `indices` selects this split's rows; only one or two batches are ever resident.

    shuffle: a fresh permutation each epoch from `generator` (seeded → repeatable).
    augment: a function x → x applied to every batch (training).
    prefetch: gather the next batch in a background thread while this one is used.
    release_bytes: drop read pages from the resident set after this many bytes (0: never).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, batch_size: int,
                 shuffle: bool = False, generator: torch.Generator | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, channels_last: bool = False,
                 *, indices=None, device: str | torch.device | None = None, prefetch: bool = True,
                 release_bytes: int = 32 << 20):
        if images.device.type != "cpu":
            raise ValueError("StreamingLoader reads from CPU (memory-mapped) images")
        self.images = images
        self.indices = (torch.arange(len(labels)) if indices is None
                        else torch.as_tensor(indices, dtype=torch.int64).cpu())
        self.device = torch.device(device) if device is not None else \
            (generator.device if generator is not None else torch.device("cpu"))
        self.labels = labels.cpu()[self.indices].to(self.device)
        self.normalizer, self.batch_size = normalizer, batch_size
        self.shuffle, self.generator, self.augment = shuffle, generator, augment
        self.channels_last, self.prefetch = channels_last, prefetch
        self._release = page_releaser(images) if release_bytes else None
        self._release_bytes, self._read = release_bytes, 0

    # __len__, num_samples, new_order, __iter__ and _to_input come from DeviceLoader (self.labels is this split's)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """uint8 rows for the split positions `local`, in that order (read sorted, then reordered)."""
        rows = self.indices[local]
        sorted_rows, perm = rows.sort()
        xs = self.images.index_select(0, sorted_rows)
        x = torch.empty_like(xs)
        x[perm] = xs  # x[perm[i]] = images[rows[perm[i]]]: back in batch order
        if self.device.type == "cuda":
            x = x.pin_memory()
        # a page fault on a file mapping maps up to 64 KiB around it (the kernel's fault-around), so a
        # randomly read 12 KB row can leave ~64 KB resident: count that, not the bytes copied
        self._read += len(rows) * max(self.images[0].numel(), 64 << 10) if len(rows) else 0
        if self._release is not None and self._read >= self._release_bytes:
            self._release()
            self._read = 0
        return x

    def iterate(self, order: torch.Tensor | None, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in `order`, from batch `start_batch` on (a resumed epoch skips what it has done)."""
        n = len(self.indices)
        starts = range(start_batch * self.batch_size, n, self.batch_size)
        order = order.cpu() if order is not None else None

        def local(start: int) -> torch.Tensor:
            if order is None:
                return torch.arange(start, min(n, start + self.batch_size))
            return order[start:start + self.batch_size]

        pool = ThreadPoolExecutor(1, thread_name_prefix="cnnlab-stream") if self.prefetch and len(starts) else None
        try:
            pending = pool.submit(self._gather, local(starts[0])) if pool else None
            for k, start in enumerate(starts):
                idx = local(start)
                if pool:
                    xb = pending.result()
                    if k + 1 < len(starts):
                        pending = pool.submit(self._gather, local(starts[k + 1]))
                else:
                    xb = self._gather(idx)
                yield self._to_input(xb.to(self.device, non_blocking=True)), self.labels[idx.to(self.device)]
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)


def prepare_streaming(ds: Dataset, split: Split, *, batch_size: int, eval_batch_size: int, device: torch.device,
                      seed: int, normalize: bool = True, augment: dict | None = None, expand: int = 0,
                      channels_last: bool = False, normalizer: Normalizer | None = None, **_ignored) -> Prepared:
    """loader.prepare's twin for data over the memory budget: the same generators, seeds and batches,
    read from ds.images (the memory-mapped cache) instead of copies on the device.

    normalizer: reuse given statistics (default: fit_normalizer over the training split).
    """
    if expand:
        raise DataError("data.expand (offline augmented copies) needs the in-memory loader; the data is over "
                        "data.memory_budget — raise the budget or use data.augment (per batch) instead")
    device = torch.device(device)
    split.expanded_from = []
    norm = normalizer or fit_normalizer(ds.images, split.train, normalize)
    g_order, g_aug, aug_fn = seeded_generators(seed, device, augment)

    def loader(idx, bs, **kw):
        return StreamingLoader(ds.images, ds.labels, norm, bs, indices=idx, device=device,
                               channels_last=channels_last, **kw)

    train = loader(split.train, batch_size, shuffle=True, generator=g_order, augment=aug_fn)
    train.aug_generator = g_aug  # its state goes into checkpoints, as with loader.prepare
    val = loader(split.val, eval_batch_size) if split.val else None
    test = loader(split.test, eval_batch_size) if split.test else None
    return Prepared(train, val, test, norm, split, "test" if test is not None else "val")
