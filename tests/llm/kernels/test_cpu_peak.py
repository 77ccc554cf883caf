"""The multiply-add peak loop (cpu_peak.cpp): it does the work it claims, so the rate it reports is real."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.kernels.peak import peak_macs_per_s, run_peak_loop
from tests.llm.kernels.common import need

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_loop_does_every_multiply_add(dtype, threads):
    need(dtype)
    lanes = 32 if dtype == torch.bfloat16 else 16
    a, b = 2.0 ** -8, 0.75  # both exact in bf16; the sums stay exact in fp32
    for iters in (1, 7, 1000):
        assert run_peak_loop(dtype, iters, threads, a, b) == iters * 24 * lanes * a * b * threads


@pytest.mark.parametrize("dtype", DTYPES)
def test_peak_is_a_finite_positive_rate(dtype):
    need(dtype)
    r = peak_macs_per_s(dtype, seconds=0.02, reps=2)
    assert r is not None and 0 < r < float("inf"), r


def test_other_dtypes_are_refused():
    assert peak_macs_per_s(torch.float16) is None
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        run_peak_loop(torch.float16, 10)
