"""benchmarks/prefill.py's memfit systems: the unfused one really runs the MLP as before the fused store."""
from __future__ import annotations

import pytest
import torch

from benchmarks.prefill import memfit_system, timed_parts
from memfit.llm.kernels.prefill import available


@pytest.mark.skipif(not available(torch.bfloat16), reason="memfit's bf16 CPU kernels are unavailable here")
def test_the_unfused_system_runs_silu_mul_apart_and_the_default_does_not():
    prompts = [[(7 * i + j) % 4000 + 1 for j in range(48)] for i in range(4)]  # 192 rows: 3 x 64-row MLP blocks
    calls = {}
    for name, unfused in (("default", False), ("unfused", True)):
        run, close = memfit_system("memfit-tiny", "auto", False, unfused=unfused)
        try:
            parts: dict[str, float] = {}
            with timed_parts(parts):
                run(prompts)
            calls[name] = parts
        finally:
            close()
    # the default fuses SiLU x up into the gate/up matmul's store; the unfused system runs the separate kernel
    assert "matmul_silu_s" in calls["default"] and "rest_silu_mul_s" not in calls["default"]
    assert "rest_silu_mul_s" in calls["unfused"] and "matmul_silu_s" not in calls["unfused"]
