"""MEMFIT_CPU_ISA: one machine runs the kernel choices of a CPU without AMX or without AVX-512.

Each case runs a fresh process (oneDNN and ATen fix their ISA at first use). The check on oneDNN is independent
of memfit's code: oneDNN's own verbose log names the implementation each matmul ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memfit.llm.kernels.build import cpu_flags

PROBE = r"""
import json, sys
import memfit, torch
from memfit.llm.kernels import build, large_m, prefill, upcast
from memfit.llm.models.packing import can_pack_for_cpu
x = torch.randn(64, 256, dtype=torch.bfloat16)
torch.nn.functional.linear(x, torch.randn(256, 256, dtype=torch.bfloat16))  # oneDNN logs its matmul to stdout
print("RESULT " + json.dumps({
    "flags": sorted(build.cpu_flags()), "aten": torch.backends.cpu.get_cpu_capability(),
    "amx_matmul": large_m.amx_linear() is not None, "prefill": prefill.kernel_for(torch.bfloat16),
    "bf16_kernel": build.unavailable_reason(torch.bfloat16) is None, "pack": can_pack_for_cpu(torch.bfloat16),
    "upcast": upcast.available(torch.bfloat16)}))
"""


def run_capped(cap: str | None) -> tuple[dict, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEMFIT_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env["ONEDNN_VERBOSE"] = "1"
    if cap is not None:
        env["MEMFIT_CPU_ISA"] = cap
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
    matmuls = [line.split(",")[6] for line in lines
               if line.startswith("onednn_verbose") and ",exec," in line and ",matmul," in line]
    return result, matmuls


needs_amx = pytest.mark.skipif(not {"amx_bf16", "avx512_bf16"} <= cpu_flags(), reason="needs a CPU with AMX-BF16")


@needs_amx
def test_uncapped_runs_amx_everywhere():
    result, matmuls = run_capped(None)
    assert result["amx_matmul"] and result["prefill"] == "amx" and result["pack"] and not result["upcast"]
    assert matmuls and all("amx" in m for m in matmuls), matmuls


@needs_amx
def test_avx512_cap_hides_amx_from_memfit_and_onednn():
    result, matmuls = run_capped("avx512")
    assert not any(f.startswith("amx") for f in result["flags"]) and "avx512_bf16" in result["flags"]
    assert not result["amx_matmul"] and result["prefill"] == "avx512"
    assert result["bf16_kernel"] and result["pack"] and not result["upcast"]
    assert matmuls and not any("amx" in m for m in matmuls), matmuls  # oneDNN's own log: no tiles


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="needs a CPU with AVX-512")
def test_avx2_cap_runs_the_upcast_path():
    result, matmuls = run_capped("avx2")
    assert not any(f.startswith(("amx", "avx512")) for f in result["flags"]) and "avx2" in result["flags"]
    assert result["aten"] == "AVX2"
    assert not result["bf16_kernel"] and not result["amx_matmul"] and result["prefill"] is None
    assert not result["pack"] and result["upcast"]  # oneDNN can't pack bf16 under AVX2: memfit upcasts
    assert not any("avx512" in m or "amx" in m for m in matmuls), matmuls


def test_unknown_cap_is_refused_with_the_choices():
    env = dict(os.environ, MEMFIT_CPU_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", "from memfit.llm.kernels.build import cpu_flags; cpu_flags()"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "MEMFIT_CPU_ISA='sse9'" in out.stderr and "avx2" in out.stderr
