"""What the machine offers: the CPU cores this process may use, and what its vector units can do.

CPUs differ between machines of the same kind: some have AVX2 only, where bf16 arithmetic is emulated
(measured 9–20× slower than fp32 for training), others AVX-512 BF16 or AMX, where bf16 matrix units make it
faster. The defaults that depend on it are decided here from the CPU's flags, with the reason recorded.
"""

from __future__ import annotations

import os
from functools import lru_cache


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cores_each(processes: int) -> int:
    """The threads each of `processes` processes running at once gets: the cores shared out, at least 1."""
    return max(1, cpu_cores() // processes)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none to read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (AVX-512 BF16 dot products or AMX tiles)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def capability(flags: frozenset[str] | set[str] | None = None) -> str:
    """The CPU kind as BENCHMARKS.md names it: AVX2, AVX-512, AVX-512 BF16, each + AMX where present."""
    flags = set(cpu_flags() if flags is None else flags)
    name = ("AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
            else "AVX2" if "avx2" in flags else "below AVX2" if flags else "unknown")
    return name + (" + AMX" if "amx_bf16" in flags else "")
