"""Prefill matmuls on a kernel chosen at run time (large_m.py) and the AMX kernel it can choose (cpu_amx.cpp):
results against F.linear, rows independent of the call's rows, one choice per shape reused, and decode steps
never on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.kernels import large_m
from memfit.llm.kernels.blocked import AMX_MLP_ROW_BLOCK, LARGE_M, BlockedLinear, mlp_row_block
from memfit.llm.kernels.peak import run_amx_peak_loop
from tests.llm.kernels.common import make_linear, need

BF16 = torch.bfloat16


def need_amx() -> None:
    need(BF16)
    if large_m.amx_linear() is None:
        pytest.skip("no AMX-BF16 here (or Linux refused this process the tile state)")


@pytest.fixture(autouse=True)
def _fresh_choices():
    large_m.reset()
    old = large_m.force(None)
    yield
    large_m.force(old)
    large_m.reset()


def amx(mod: BlockedLinear, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """mod's weight through the AMX kernel directly. x: (M, K) -> (M, N)."""
    y = torch.empty(x.shape[0], mod.out_features, dtype=BF16)
    rc = large_m.amx_linear()(x.data_ptr(), x.stride(0), mod._wp, mod._bp, y.data_ptr(), mod.out_features,
                              x.shape[0], mod.out_features, mod.in_features, mod.nb, threads)
    assert rc == 0, rc
    return y


def within_bf16(got: torch.Tensor, x: torch.Tensor, lin) -> None:
    """F.linear in fp32 on the same bf16 values, then rounded: at most about one bf16 ulp apart (the
    tolerance tests/llm/kernels/test_cpu_blocked.py holds the AVX-512 kernel to)."""
    w, b = lin.weight.float(), None if lin.bias is None else lin.bias.float()
    ref = F.linear(x.float(), w, b)
    scale = F.linear(x.float().abs(), w.abs()) + (0 if b is None else b.abs())
    err = (got.float() - ref).abs()
    assert (err <= 2.0 ** -7 * ref.abs() + 1e-5 * scale + 1e-6).all(), err.max().item()


@pytest.mark.parametrize("nb", [32, 48, 64])
@pytest.mark.parametrize("n,k,bias", [(130, 1024, True), (77, 64, False), (200, 96, True), (16, 32, False)])
def test_amx_kernel_matches_f_linear(nb, n, k, bias):
    """N tails inside a panel (77, 130, 200 against panels of 32-64), K of 1-32 tile steps, ragged row tiles, a
    strided x (ldx > K), rows past one row block (600 > 512), 1 and 2 threads."""
    need_amx()
    lin = make_linear(n, k, bias, BF16, seed=5)
    mod = BlockedLinear(lin, nb=nb)
    g = torch.Generator().manual_seed(3)
    for m in (1, 15, 64, 65, 197, 600):
        x = torch.randn(m, k + 7, generator=g).to(BF16)[:, 3:3 + k]
        for threads in (1, 2):
            within_bf16(amx(mod, x, threads), x, lin)


def test_amx_rows_do_not_depend_on_the_calls_rows():
    """Each row is computed from its own x row by the same instructions: a row's bits are the same in a call of
    600 rows, of 65, of 64 and alone (the MLP's row blocks rely on it)."""
    need_amx()
    lin = make_linear(300, 256, True, BF16, seed=7)
    mod = BlockedLinear(lin)
    x = torch.randn(600, 256, generator=torch.Generator().manual_seed(1)).to(BF16)
    whole = amx(mod, x)
    assert torch.equal(amx(mod, x[:65]), whole[:65])
    assert torch.equal(amx(mod, x[536:]), whole[536:])
    assert torch.equal(amx(mod, x[17:18]), whole[17:18])


def test_amx_refuses_what_it_cannot_run():
    need_amx()
    mod = BlockedLinear(make_linear(40, 48, False, BF16))  # K = 48: not a whole tile step
    x = torch.randn(64, 48).to(BF16)
    y = torch.empty(64, 40, dtype=BF16)
    assert large_m.amx_linear()(x.data_ptr(), 48, mod._wp, None, y.data_ptr(), 40, 64, 40, 48, 64, 1) == -3
    assert large_m.candidates(BF16, 48) == ("avx512",)
    assert large_m.candidates(torch.float32, 64) == ("avx512",)


def test_amx_peak_loop_does_every_multiply_add():
    need_amx()
    for iters in (1, 9, 1000):
        assert run_amx_peak_loop(iters) == iters * 32 * 2.0 ** -16


def test_prefill_steps_choose_once_per_shape_and_reuse_it(monkeypatch):
    """The first prefill call of a shape times every candidate (2 x TRIALS clock pairs) and keeps one; later
    calls of that shape, with other row counts, read no clock and give the kept kernel's bits."""
    need(BF16)
    lin = make_linear(96, 128, True, BF16, seed=2)
    mod = BlockedLinear(lin)
    reads = []
    real = large_m.time.process_time
    monkeypatch.setattr(large_m.time, "process_time", lambda: reads.append(1) or real())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 128, generator=g).to(BF16)
    with large_m.prefill_step():
        first = mod(x)
    names = large_m.candidates(BF16, 128)
    chosen = large_m.choices()
    if len(names) == 1:
        assert chosen == {} and reads == []  # nothing to choose between
        return
    assert list(chosen) == [(96, 128, 64)] and chosen[(96, 128, 64)].rows == 200
    assert set(chosen[(96, 128, 64)].seconds) == set(names) and len(reads) == 2 * 2 * large_m.TRIALS
    reads.clear()
    with large_m.prefill_step():
        again = mod(x[:70])
    assert reads == [] and large_m.choices() == chosen
    kept = chosen[(96, 128, 64)].kernel
    assert torch.equal(again, first[:70])  # one kernel for every row count: the same bits per row
    want = amx(mod, x) if kept == "amx" else torch.empty(0)
    if kept == "amx":
        assert torch.equal(first, want)
    within_bf16(first, x, lin)


def test_outside_a_prefill_step_many_rows_stay_on_the_decode_kernel():
    """Decode steps (and direct calls) never enter prefill_step: even with AMX forced, 64+ rows give the AVX-512
    kernel's bits, the ones a pure decode step had before."""
    need_amx()
    lin = make_linear(300, 1024, True, BF16, seed=9)  # K = 1024: the two kernels' bits differ somewhere
    mod = BlockedLinear(lin)
    x = torch.randn(200, 1024, generator=torch.Generator().manual_seed(6)).to(BF16)
    before = mod(x)  # no step marked: the AVX-512 kernel
    large_m.force("amx")
    assert torch.equal(mod(x), before)
    with large_m.prefill_step():
        inside = mod(x)
        with large_m.prefill_step(False):  # a decode step nested anywhere turns it off
            assert torch.equal(mod(x), before)
        assert torch.equal(mod(x[:LARGE_M - 1]), before[:LARGE_M - 1])  # below LARGE_M rows: decode kernel
    assert torch.equal(inside, amx(mod, x)) and not torch.equal(inside, before)
    assert large_m.choices() == {}  # forced: nothing measured
    with pytest.raises(ValueError, match="one of"):
        large_m.force("onednn")


def test_mlp_row_blocks_keep_their_bits_on_the_chosen_kernel():
    """The MLP's blocks (AMX_MLP_ROW_BLOCK rows where prefill runs on AMX, LARGE_M otherwise) and the whole step
    give the same bits inside a prefill step too."""
    need_amx()
    from memfit.llm.kernels.backends import mlp_row_blocks
    from memfit.llm.models.config import ModelConfig
    from memfit.llm.models.llama import MLP

    cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=64)
    mlp = MLP(cfg).to(BF16).requires_grad_(False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, BlockedLinear(getattr(mlp, name)))
    b = mlp_row_block(BF16)
    assert b == AMX_MLP_ROW_BLOCK  # AMX here: blocks that keep a 512-token step to two
    assert mlp_row_block(torch.float32) == LARGE_M
    x = torch.randn(3 * b - 9, 128, generator=torch.Generator().manual_seed(8)).to(BF16)  # blocks b, b - 9 + b
    large_m.force("amx")
    with large_m.prefill_step():
        whole = mlp(x)
        mlp_row_blocks(mlp)
        assert mlp.row_block == b
        assert torch.equal(mlp(x), whole)
        mlp.row_block = LARGE_M  # and in the decode kernel's blocks of 64
        assert torch.equal(mlp(x), whole)
