"""CPU defaults are decided by what the CPU can do (its flags), with the reason recorded."""

from __future__ import annotations

import os

import torch

from cnnlab.hardware import capability, cpu_cores, cpu_flags, native_bf16
from cnnlab.training.runtime import Runtime, auto_precision

AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
SAPPHIRE = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


def test_capability_names_each_cpu_kind():
    assert capability(AVX2) == "AVX2"
    assert capability(AVX512) == "AVX-512"
    assert capability(AVX512_BF16) == "AVX-512 BF16"
    assert capability(SAPPHIRE) == "AVX-512 BF16 + AMX"
    assert capability(set()) == "unknown"
    assert not native_bf16(AVX2) and not native_bf16(AVX512) and native_bf16(AVX512_BF16) and native_bf16(SAPPHIRE)


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it():
    cpu = torch.device("cpu")
    for flags, expected in ((AVX2, "32"), (AVX512, "32"), (AVX512_BF16, "bf16-mixed"), (SAPPHIRE, "bf16-mixed")):
        precision, reason = auto_precision(cpu, flags)
        assert precision == expected, (flags, precision)
        assert capability(flags) in reason


def test_the_runtime_records_its_decisions_for_this_cpu():
    r = Runtime("cpu", "auto")
    d = r.describe()
    assert d["precision"] == ("bf16-mixed" if native_bf16() else "32")  # torch's flags: a oneDNN ISA limit counts
    assert d["cpu_kind"] == capability() and set(d["defaults_because"]) >= {"precision", "channels_last", "threads"}
    assert d["threads"] == cpu_cores()
    fixed = Runtime("cpu", "32", threads=1, channels_last=False).describe()
    assert fixed["precision"] == "32" and "precision" not in fixed["defaults_because"]
    assert "channels_last" not in fixed["defaults_because"] and "threads" not in fixed["defaults_because"]


def test_bf16_reaches_the_accuracy_of_fp32_on_the_demo(tmp_path):
    """The demo recipe on 40 % of Animal-Shape (4,000 images, 600 test), 10 epochs, in fp32 and in bf16-mixed
    on whatever CPU runs the test (emulated where it has no bf16 units: slower, still correct). Tolerance:
    3 points of test accuracy, about 2.5 standard errors at n = 600."""
    from pathlib import Path

    from conftest import fit_run

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    over = {"data.max_per_class": 400, "train.epochs": 10}
    fp32 = fit_run(dict(over, **{"train.precision": "32"}), config=demo, out=tmp_path / "fp32")
    bf16 = fit_run(dict(over, **{"train.precision": "bf16-mixed"}), config=demo, out=tmp_path / "bf16")
    assert fp32.env["precision"] == "32" and bf16.env["precision"] == "bf16-mixed"
    a32, a16 = fp32.metrics["accuracy"], bf16.metrics["accuracy"]
    print(f"DEMO fp32 {a32:.4f} bf16 {a16:.4f}")
    assert a32 > 0.85 and a16 > 0.85  # both learn (chance: 0.10)
    assert abs(a16 - a32) <= 0.03, (a32, a16)


def test_cores_each_shares_the_cores_out_and_never_gives_zero(monkeypatch):
    import cnnlab.hardware as hw

    monkeypatch.setattr(hw, "cpu_cores", lambda: 8)
    assert [hw.cores_each(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_a_onednn_limit_takes_away_what_torch_may_not_use():
    from cnnlab.hardware import torch_limits

    assert torch_limits({}) == (set(), None)
    assert torch_limits({"ONEDNN_MAX_CPU_ISA": "ALL"}) == (set(), None)
    dropped, why = torch_limits({"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert why == "ONEDNN_MAX_CPU_ISA=AVX2" and {"avx512f", "avx512_bf16", "amx_bf16"} <= dropped
    assert capability(SAPPHIRE - dropped) == "AVX2" and not native_bf16(SAPPHIRE - dropped)
    dropped, _ = torch_limits({"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert capability(SAPPHIRE - dropped) == "AVX-512 BF16" and native_bf16(SAPPHIRE - dropped)
    dropped, _ = torch_limits({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})
    assert capability(SAPPHIRE - dropped) == "AVX-512 BF16 + AMX"
    # ONEDNN_ wins over DNNL_, as in oneDNN
    assert torch_limits({"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "ALL"})[1] == "ONEDNN_MAX_CPU_ISA=AVX2"


def test_auto_precision_follows_a_onednn_limit_on_this_cpu(tmp_path):
    """In a fresh process with ONEDNN_MAX_CPU_ISA=AVX2, torch's bf16 products lose the CPU's bf16 units (a 512²
    one measured 600× slower on an AMX CPU): auto must pick fp32 there and say why, whatever the chip has."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch\nfrom cnnlab.training.runtime import Runtime\n"
            "from cnnlab.models import native\n"
            "d = Runtime('cpu', 'auto').describe()\n"
            "d['stem_one_pass_in_bf16'] = native.stem_forward_pays(torch.bfloat16)\n"
            "print(json.dumps(d))")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["precision"] == "32"
    if native_bf16(cpu_flags()):  # a chip with bf16 units, held below them
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in d["defaults_because"]["precision"]
    if "avx2" in cpu_flags():
        assert d["torch_cpu_limit"] == "ONEDNN_MAX_CPU_ISA=AVX2: AVX2"
    # the stem's one native pass stands aside for oneDNN's convolution only where that may use AMX
    from cnnlab.models.native import stem_pays

    assert d["stem_one_pass_in_bf16"] == stem_pays()


def test_each_instruction_set_setting_compiles_into_a_cache_of_its_own(monkeypatch, tmp_path):
    """torch.compile's cache folder: one per CPU flags, ATen capability and oneDNN limit (torch's own cache reuses
    code compiled for another instruction set: hardware.compile_cache), unless the user named one."""
    import subprocess
    import sys

    from cnnlab.hardware import compile_cache
    from conftest import finished

    assert compile_cache({"TORCHINDUCTOR_CACHE_DIR": "/srv/inductor"}) == ("/srv/inductor",
                                                                            "TORCHINDUCTOR_CACHE_DIR, as set")
    here, why = compile_cache({})
    assert "torchinductor_" in here and capability() in why
    assert compile_cache({}) == (here, why)  # the same setting: the same folder, so its code is reused
    limited, why_limited = compile_cache({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert limited != here and "ONEDNN_MAX_CPU_ISA=AVX2" in why_limited
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert compile_cache({})[0] not in (here, limited)
    # a real process with ATen's vector kernels turned off: its own folder, under its temporary directory
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    code = "from cnnlab.hardware import compile_cache; print(compile_cache()[0])"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, TMPDIR=str(tmp_path), **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ({}, {"ATEN_CPU_CAPABILITY": "default"})]  # at once: each is its start-up
    done = [finished(proc, 120) for proc in procs]
    assert all(p.returncode == 0 for p in done), [p.stderr[-2000:] for p in done]
    folders = [p.stdout.strip() for p in done]
    assert folders[0] != folders[1] and all(os.path.dirname(f) == str(tmp_path) for f in folders)


def test_threads_count_logical_cpus_and_say_so_where_cores_have_smt(monkeypatch, request):
    """The default threads: one per logical CPU of the affinity mask; env.json's reason says when those are SMT
    threads of fewer physical cores (torch's own default counts physical cores)."""
    import cnnlab.training.runtime as runtime_mod
    from cnnlab.hardware import physical_cores

    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    n = physical_cores()
    assert n is None or 1 <= n <= cpu_cores()
    why = Runtime("cpu", "32").describe()["defaults_because"]["threads"]
    assert why.startswith(f"one per logical CPU this process may use ({cpu_cores()})")
    assert ("SMT" in why) == (n is not None and n < cpu_cores())
    monkeypatch.setattr(runtime_mod, "cpu_cores", lambda: 4)
    monkeypatch.setattr(runtime_mod, "physical_cores", lambda: 2)
    r = Runtime("cpu", "32")
    assert r.threads == 4 and "SMT threads of 2 physical cores" in r.describe()["defaults_because"]["threads"]
    monkeypatch.setattr(runtime_mod, "physical_cores", lambda: None)  # no topology to read: said nothing of it
    why = Runtime("cpu", "32").describe()["defaults_because"]["threads"]
    assert why == "one per logical CPU this process may use (4)"
