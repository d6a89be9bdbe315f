"""What the machine offers: the CPU cores this process may use, and what its vector units can do.

CPUs differ between machines of the same kind: some have AVX2 only, where bf16 arithmetic is emulated
(measured 9–20× slower than fp32 for training), others AVX-512 BF16 or AMX, where bf16 matrix units make it
faster. The defaults that depend on it are decided here from the CPU's flags, with the reason recorded.
"""

from __future__ import annotations

import os
from functools import lru_cache

# Whether the user chose torch.compile's cache folder: read once, at import, because torch sets the variable
# itself (to its default) the first time it compiles anything in the process.
_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or None


def cpu_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask: a container's or taskset's limit; a core's SMT
    threads each count: physical_cores), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    """Physical cores among the CPUs this process may run on (Linux sysfs: a core's SMT hardware threads
    count once), or None where the topology cannot be read."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return None
    cores = set()
    for n in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{n}/topology/core_id", encoding="ascii") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{n}/topology/physical_package_id", encoding="ascii") as f:
                package = f.read().strip()
        except OSError:
            return None
        cores.add((package, core))
    return len(cores) or None


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


# oneDNN's instruction-set limits (ONEDNN_MAX_CPU_ISA, DNNL_MAX_CPU_ISA), lowest first, with the flags each
# level allows beyond the one before: a limit drops every flag allowed only above it. Names from oneDNN's
# dnnl_cpu_isa_t (AVX10_1_512 is its newer name for AVX512_CORE_FP16, AVX10_1_512_AMX for AVX512_CORE_AMX).
_ONEDNN_LEVELS = (
    ("SSE41", set()), ("AVX", set()), ("AVX2", set()), ("AVX2_VNNI", set()), ("AVX2_VNNI_2", set()),
    ("AVX512_CORE", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
    ("AVX512_CORE_VNNI", {"avx512_vnni"}), ("AVX512_CORE_BF16", {"avx512_bf16"}),
    ("AVX512_CORE_FP16", {"avx512_fp16"}), ("AVX10_1_512", set()),
    ("AVX512_CORE_AMX", {"amx_bf16", "amx_tile", "amx_int8"}), ("AVX10_1_512_AMX", set()),
    ("AVX512_CORE_AMX_FP16", {"amx_fp16"}), ("AVX10_1_512_AMX_FP16", set()),
)


def torch_limits(env=None) -> tuple[set[str], str | None]:
    """The CPU flags torch's oneDNN has been told not to use (ONEDNN_MAX_CPU_ISA, or DNNL_MAX_CPU_ISA where that
    is unset: oneDNN runs torch's convolutions and bf16 products), and the setting that says so. Measured on an
    Intel Xeon with AMX (2 threads, a 512² product): bf16 1,441 GFLOP/s, 235 with ONEDNN_MAX_CPU_ISA=
    AVX512_CORE_BF16 (no AMX), 2.4 with =AVX2 — where fp32 stayed at ~380. So the defaults follow what oneDNN may
    use, not what the chip has. (ATEN_CPU_CAPABILITY changes ATen's elementwise kernels only: bf16 products kept
    their speed under =avx2.)"""
    env = os.environ if env is None else env
    names = [name for name, _ in _ONEDNN_LEVELS]
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = env.get(var, "").strip().upper()
        if value:
            if value in names:
                return {f for _, extra in _ONEDNN_LEVELS[names.index(value) + 1:] for f in extra}, f"{var}={value}"
            return set(), None  # ALL / DEFAULT, or a name oneDNN does not know either: no limit
    return set(), None


@lru_cache(maxsize=1)
def usable_flags() -> frozenset[str]:
    """The CPU's flags less those torch has been told not to use (torch_limits): what torch's maths runs on.
    cnnlab's own compiled kernels (models/native.py) are built for the CPU itself and use cpu_flags()."""
    return cpu_flags() - torch_limits()[0]


def native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether bf16 is computed in hardware (AVX-512 BF16 dot products or AMX tiles) — by default, by torch on
    this CPU: its flags less any limit torch was given (usable_flags)."""
    flags = usable_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def capability(flags: frozenset[str] | set[str] | None = None) -> str:
    """The CPU kind as BENCHMARKS.md names it: AVX2, AVX-512, AVX-512 BF16, each + AMX where present."""
    flags = set(cpu_flags() if flags is None else flags)
    name = ("AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
            else "AVX2" if "avx2" in flags else "below AVX2" if flags else "unknown")
    return name + (" + AMX" if "amx_bf16" in flags else "")


def compile_cache(env=None) -> tuple[str, str]:
    """(the folder torch.compile keeps its compiled code in for this process, why): one per CPU and instruction-set
    setting, unless the user's TORCHINDUCTOR_CACHE_DIR names one (then that; `env`: a given environment's).

    torch 2.14's inductor keys its on-disk cache without the instruction set it compiled for. On an AVX-512 CPU,
    harahap-cnn compiled under ATEN_CPU_CAPABILITY=avx2 and run again without it aborted ("free(): invalid
    pointer"); the other way round, its logits came out ~1e34; compiled without the setting and run again
    under ATEN_CPU_CAPABILITY=default, the cached source no longer built. To see it: with one fresh folder in
    TORCHINDUCTOR_CACHE_DIR, run `torch.compile(create_model("harahap-cnn", 10, 1, 28).eval())` on a batch in
    a process with ATEN_CPU_CAPABILITY=avx2, then in one without, and compare with the eager logits
    (tests/test_hardware.py checks that each setting gets a folder of its own).
    Machines that share a cache folder but not a CPU kind meet the same. So torch's default folder (under the
    temporary directory) gets a sibling per torch version, machine, CPU flags, ATen capability (this
    process's) and oneDNN limit: each setting compiles once into its own."""
    import getpass
    import hashlib
    import platform
    import tempfile

    import torch

    chosen = _USER_INDUCTOR_DIR if env is None else env.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen:
        return chosen, "TORCHINDUCTOR_CACHE_DIR, as set"
    env = os.environ if env is None else env
    aten = torch.backends.cpu.get_cpu_capability()
    limit = torch_limits(env)[1] or "no oneDNN limit"
    key = hashlib.sha256("\0".join([torch.__version__, platform.machine(), " ".join(sorted(cpu_flags())), aten,
                                    limit]).encode()).hexdigest()[:16]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "user"
    folder = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_cnnlab_{key}")
    return folder, (f"its own for this CPU ({capability()}), ATen's {aten} kernels and {limit}: torch's cache "
                    "does not tell code compiled for one instruction set from another's")
