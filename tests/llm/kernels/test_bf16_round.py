"""bf16x16.h's to_bf16, which every bf16 store of memfit's CPU kernels runs: vcvtneps2bf16 with a fall-back for
denormals must give the integer rounding's bits (round to nearest even, denormals rounded, NaN quieted with its
payload) for every input, so changing it changed no kernel's output."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from memfit.llm.kernels.build import load_cpu_linear
from tests.llm.kernels.common import need


def reference(bits: np.ndarray) -> np.ndarray:
    """The bf16 bits of float32 `bits` (uint32): RNE on the integer, NaN -> its high half | 0x40."""
    u = bits.astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    r[nan] = (bits[nan] >> 16) | 0x40
    return r.astype(np.uint16)


def kernel_round(bits: np.ndarray) -> np.ndarray:
    fn = load_cpu_linear().cdll.memfit_bf16_round
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    x = np.ascontiguousarray(bits.astype(np.uint32))
    y = np.empty(len(x), dtype=np.uint16)
    fn(x.ctypes.data, y.ctypes.data, len(x))
    return y


def inputs() -> np.ndarray:
    """Every denormal (both signs); every high half with the low halves at the rounding boundaries; zeros, infinities,
    NaNs with payloads; random bit patterns."""
    den = np.arange(1, 1 << 23, dtype=np.uint32)
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF,
                        0x7F7FFFFF, 0x7F7F8000, 0x00800000, 0x007FFFFF, 0x80800000], dtype=np.uint32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    # mixed into vectors of normal numbers too: a vector holding one denormal takes the fall-back as a whole
    return np.concatenate([den, den | 0x80000000, (high[:, None] | lows[None, :]).ravel(), special, rand])


def test_every_boundary_and_denormal_rounds_as_the_integer_formula():
    need(torch.bfloat16)
    bits = inputs()
    got, want = kernel_round(bits), reference(bits)
    bad = np.flatnonzero(got != want)
    assert not len(bad), f"{len(bad)} inputs differ, e.g. {bits[bad[0]]:#010x}: {got[bad[0]]:#06x} != {want[bad[0]]:#06x}"


@pytest.mark.parametrize("n", [1, 15, 17, 33])
def test_tails_and_a_lone_denormal_in_a_vector(n):
    need(torch.bfloat16)
    bits = np.full(n, 0x3F808001, dtype=np.uint32)  # 1.0039..., rounds up
    bits[n // 2] = 0x00012345  # a denormal among normals
    assert (kernel_round(bits) == reference(bits)).all()


def test_matches_torch_for_finite_values():
    """PyTorch's float32 -> bfloat16 conversion (RNE, denormals kept) agrees on every non-NaN input here."""
    need(torch.bfloat16)
    bits = inputs()
    bits = bits[(bits & 0x7FFFFFFF) <= 0x7F800000]
    t = torch.from_numpy(bits.view(np.float32).copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (kernel_round(bits) == t).all()
