"""The MLP's gate/up matmul with SiLU(gate) * up fused into the matmul's store, on AMX tiles (cpu_amx.cpp,
memfit_amx_linear_silu_bf16) and on the AVX-512 kernel (cpu_blocked.cpp, memfit_blocked_linear_silu_bf16), through
BlockedLinear.silu_mul_rows and models/llama.py's MLP: the same bits as the unfused path (that kernel's matmul into
(M, 2I), then CpuDecodeOps' silu_mul kernel), the up half never written, and each fused call taken only where the
unfused matmul would run all the rows on the same kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.kernels import large_m
from memfit.llm.kernels.blocked import LARGE_M, BlockedLinear, amx_linear_silu, blocked_linear_silu
from memfit.llm.kernels.decode import CpuDecodeOps
from tests.llm.kernels.common import make_linear, need

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("fresh_large_m_choices")


KERNELS = ["avx512", "amx"]


def need_amx() -> None:
    need(BF16)
    if amx_linear_silu() is None:
        pytest.skip("no AMX-BF16 here (or Linux refused this process the tile state)")


def need_kernel(kernel: str) -> None:
    """The kernel's fused call can run here; and large_m.force(kernel): prefill steps keep it for every shape."""
    need(BF16)
    if kernel == "amx":
        need_amx()
    assert blocked_linear_silu() is not None  # wherever the bf16 blocked kernel runs
    large_m.force(kernel)


def unfused(mod: BlockedLinear, x: torch.Tensor) -> torch.Tensor:
    """The path the fusion replaces: mod(x) on the forced kernel (M, 2I), then silu_mul's kernel over its halves
    -> (M, I)."""
    with large_m.prefill_step():
        both = mod(x)
    gate, up = both.chunk(2, dim=-1)
    return CpuDecodeOps(BF16).silu_mul(gate, up)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nb", [32, 48, 64])
@pytest.mark.parametrize("i,k,m,bias", [(2048, 768, 600, False), (96, 64, 77, True), (192, 256, 64, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_silu_has_the_unfused_paths_bits(kernel, nb, i, k, m, bias, threads):
    """I of several panels (and of one 48-wide panel's 32 + 16 blocks), rows past one row block (600 > 512 at
    K = 768 on AMX, > 84 on AVX-512) and ragged row tiles (77), with and without bias, 1 and 2 threads; a strided
    x."""
    if i % nb:
        pytest.skip("I must be a multiple of nb (the kernels refuse it: see test_fused_silu_runs_only_...)")
    need_kernel(kernel)
    lin = make_linear(2 * i, k, bias, BF16, seed=7)
    with torch.no_grad():  # activations of the MLP's range, where SiLU's exponential matters
        lin.weight.mul_(4.0)
    mod = BlockedLinear(lin, nb=nb, nthreads=threads)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, k + 32, generator=g).to(BF16)[:, :k]  # ldx > K
    want = unfused(mod, x)
    out = torch.full((m, 2 * i), 7.0, dtype=BF16)  # the step arena's (M, 2I) work region
    with large_m.prefill_step():
        got = mod.silu_mul_rows(x, out)
    assert got is not None and got.data_ptr() == out.data_ptr() and got.shape == (m, i)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit for bit
    assert torch.all(out[:, i:] == 7.0)  # the up half is never written
    with large_m.prefill_step():
        alone = mod.silu_mul_rows(x)  # no output given: an (M, I) tensor of its own
    assert torch.equal(alone.view(torch.int16), want.view(torch.int16))
    # and both against fp32 arithmetic on the same bf16 values: within bf16 rounding of each step
    both = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    ref = F.silu(both[:, :i]) * both[:, i:]
    assert torch.allclose(got.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item() / 64)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_silu_has_the_unfused_paths_bits_for_every_bf16_gate_value(kernel):
    """The kernels look SiLU up in a table of every bf16 value (cpu_decode.cpp's memfit_silu_table) instead of
    computing it:
    every gate value a call can produce, each of the 65536 bf16 bit patterns as the gate's bias over a zero weight
    (so gate = bias: denormals, infinities and NaNs included; -0 arrives as +0, a signalling NaN quieted), times
    an up of 1, against the unfused path bit for bit."""
    need_kernel(kernel)
    i, k, m = 1 << 16, 32, LARGE_M
    lin = torch.nn.Linear(k, 2 * i, bias=True).to(BF16)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias[:i].view(torch.int16).copy_(torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16))
        lin.bias[i:] = 1.0
    mod = BlockedLinear(lin, nb=64)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(BF16)
    want = unfused(mod, x)  # (M, I): row r, column j = bf16(SiLU(bias[j])) whatever the row
    with large_m.prefill_step():
        got = mod.silu_mul_rows(x)
    assert got is not None and torch.equal(got.view(torch.int16), want.view(torch.int16))
    g = lin.bias[:i].float()
    normal = g.isfinite() & (g.abs() >= 2.0 ** -60) & (g > -60)  # the bf16 rounding flushes denormal results
    assert torch.allclose(got[0][normal].float(), F.silu(g[normal]), rtol=2.0 ** -7, atol=0)


def test_fused_silu_runs_only_where_the_unfused_matmul_would_be_on_amx(monkeypatch):
    need_amx()
    lin = make_linear(2 * 128, 64, False, BF16, seed=3)
    mod = BlockedLinear(lin, nb=64)
    x = torch.randn(LARGE_M, 64).to(BF16)
    large_m.force("amx")
    with large_m.prefill_step(decode_rows=2):
        assert mod.silu_mul_rows(x) is None  # a mixed step's decode rows run apart on the AVX-512 kernel
    calls = []
    amx_fn = amx_linear_silu()
    monkeypatch.setattr("memfit.llm.kernels.blocked.amx_linear_silu", lambda: calls.append(1) or amx_fn)
    with large_m.prefill_step():
        assert mod.silu_mul_rows(x) is not None
    assert calls == [1]  # the AMX kernel's fused call, as the shape's kept kernel is AMX
    odd = BlockedLinear(make_linear(2 * 96, 64, False, BF16, seed=3), nb=64)  # I = 96: not a multiple of nb
    y = torch.empty(LARGE_M, 96, dtype=BF16)
    rc = amx_fn(x.data_ptr(), 64, odd._wp, None, y.data_ptr(), 96, LARGE_M, 96, 64, 64, 1)
    assert rc == -6


def test_fused_silu_runs_on_the_avx512_kernel_wherever_the_unfused_matmul_would():
    """Outside a prefill step, in one whose shape keeps the AVX-512 kernel, and in a mixed step on it (the
    AVX-512 kernel runs decode rows too), the fused call runs, with the unfused path's bits; under LARGE_M rows (the
    unfused matmul runs another kernel there) or I not a multiple of nb it does not."""
    need(BF16)
    lin = make_linear(2 * 128, 64, True, BF16, seed=3)
    mod = BlockedLinear(lin, nb=64)
    x = torch.randn(LARGE_M + 3, 64, generator=torch.Generator().manual_seed(4)).to(BF16)
    gate, up = mod(x).chunk(2, dim=-1)  # outside a prefill step: the AVX-512 kernel
    want = CpuDecodeOps(BF16).silu_mul(gate, up)
    got = mod.silu_mul_rows(x)
    assert got is not None and torch.equal(got.view(torch.int16), want.view(torch.int16))
    large_m.force("avx512")
    with large_m.prefill_step(decode_rows=2):
        got = mod.silu_mul_rows(x)
    assert got is not None and torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert mod.silu_mul_rows(x[: LARGE_M - 1]) is None  # too few rows: the unfused matmul is the decode kernel's
    fn = blocked_linear_silu()
    y = torch.empty(LARGE_M, 128, dtype=BF16)
    assert fn(x.data_ptr(), 64, mod._wp, None, y.data_ptr(), 128, LARGE_M - 1, 128, 64, 64, 1) == -7
    odd = BlockedLinear(make_linear(2 * 96, 64, False, BF16, seed=3), nb=64)  # I = 96: not a multiple of nb
    assert odd.silu_mul_rows(x) is None
    assert fn(x.data_ptr(), 64, odd._wp, None, y.data_ptr(), 96, LARGE_M, 96, 64, 64, 1) == -6


class _UnfusedOps(CpuDecodeOps):
    fuses_silu_mul = False  # the model then runs the gate/up matmul and silu_mul apart, as before the fusion


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_mlp_takes_the_fused_path_in_prefill_rows_with_the_same_bits(kernel, monkeypatch):
    """models/llama.py's MLP over 300 rows in 128-row blocks: fused where its ops allow it, the output bit for
    bit the unfused one's, and the fused kernel really called (counted)."""
    need_kernel(kernel)
    from memfit.llm.models.config import ModelConfig
    from memfit.llm.models.llama import MLP

    cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    mlp = MLP(cfg).to(BF16).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
    both = torch.nn.Linear(128, 512, bias=False).to(BF16).requires_grad_(False)
    both.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    mlp.gate_up_proj, mlp.down_proj = BlockedLinear(both, nb=64), BlockedLinear(mlp.down_proj, nb=64)
    mlp.row_block = 128
    x = torch.randn(300, 128, generator=g).to(BF16)
    calls = []
    real = BlockedLinear.silu_mul_rows
    monkeypatch.setattr(BlockedLinear, "silu_mul_rows", lambda self, *a: calls.append(real(self, *a)) or calls[-1])
    with large_m.prefill_step():
        mlp.ops = CpuDecodeOps(BF16)
        fused = mlp(x)
        assert len(calls) == 2 and all(c is not None for c in calls)  # two blocks: 128 rows, then 172, fused
        mlp.ops = _UnfusedOps(BF16)
        plain = mlp(x)
        assert len(calls) == 2  # not asked when the ops' silu_mul is not the kernel's
    assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))
