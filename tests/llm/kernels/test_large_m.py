"""Prefill matmuls on a kernel chosen at run time (large_m.py) and the AMX kernel it can choose (cpu_amx.cpp):
results against F.linear, rows independent of the call's rows, one choice per shape reused, and decode steps
never on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.kernels import large_m
from memfit.llm.kernels.blocked import BF16_MLP_ROW_BLOCK, LARGE_M, BlockedLinear, mlp_row_block
from memfit.llm.kernels.peak import run_amx_peak_loop
from tests.llm.kernels.common import make_linear, need

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("fresh_large_m_choices")


def need_amx() -> None:
    need(BF16)
    if large_m.amx_linear() is None:
        pytest.skip("no AMX-BF16 here (or Linux refused this process the tile state)")


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


@pytest.mark.parametrize("kernel", ["avx512", "amx"])
def test_mlp_row_blocks_keep_their_bits_on_the_chosen_kernel(kernel):
    """The MLP's blocks (BF16_MLP_ROW_BLOCK rows for bf16, LARGE_M for float32) and the whole step
    give the same bits inside a prefill step too, on either kernel."""
    if kernel == "amx":
        need_amx()
    else:
        need(BF16)
    from memfit.llm.kernels.backends import mlp_row_blocks
    from memfit.llm.models.config import ModelConfig
    from memfit.llm.models.llama import MLP

    cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=64)
    mlp = MLP(cfg).to(BF16).requires_grad_(False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, BlockedLinear(getattr(mlp, name)))
    b = mlp_row_block(BF16)
    assert b == BF16_MLP_ROW_BLOCK  # blocks that keep a 512-token step to two
    assert mlp_row_block(torch.float32) == LARGE_M
    x = torch.randn(3 * b - 9, 128, generator=torch.Generator().manual_seed(8)).to(BF16)  # blocks b, b - 9 + b
    large_m.force(kernel)
    with large_m.prefill_step():
        whole = mlp(x)
        mlp_row_blocks(mlp)
        assert mlp.row_block == b
        assert torch.equal(mlp(x), whole)
        mlp.row_block = LARGE_M  # and in the decode kernel's blocks of 64
        assert torch.equal(mlp(x), whole)


SCRATCH_PROBE = """
import ctypes, json, resource, sys
import torch
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD fixed: freed scratch goes back, none is reused
from memfit.llm.kernels import large_m
from memfit.llm.kernels.blocked import BlockedLinear
out = []
for m, k, threads in json.loads(sys.argv[1]):
    lin = BlockedLinear(torch.nn.Linear(k, 320).to(torch.bfloat16))
    x, y = torch.randn(m, k).to(torch.bfloat16), torch.empty(m, 320, dtype=torch.bfloat16)
    args = (x.data_ptr(), k, lin._wp, lin._bp, y.data_ptr(), 320, m, 320, k, lin.nb, threads)
    assert large_m.amx_linear()(*args) == 0  # warm: the library, the tile state, the OpenMP threads
    # malloc serves a block from a free chunk of the heap before it maps one (mmap only when the heap can't), so
    # the scratch could land on pages already resident and fault nothing: give free heap pages back first
    libc.malloc_trim(0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert large_m.amx_linear()(*args) == 0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    out.append([faults * resource.getpagesize(), large_m.amx_scratch_bytes(m, [k], threads)])
print(json.dumps(out))
"""


def test_amx_scratch_bytes_cover_the_pages_a_call_touches():
    """What the ledger counts for the AMX kernel's scratch (large_m.amx_scratch_bytes) against an independent
    measure: the fresh pages a call faults in (getrusage minor faults, in a process whose malloc returns freed
    scratch to the system and whose free heap pages are trimmed before the call). The count covers them (each
    block counted as the pages malloc may map for it: a page more than its bytes) and is not far above."""
    need_amx()
    import json
    import subprocess
    import sys

    cases = [[512, 768, 1], [256, 2048, 1], [100, 768, 1], [512, 768, 2]]
    run = subprocess.run([sys.executable, "-c", SCRATCH_PROBE, json.dumps(cases)], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    for (m, k, threads), (touched, counted) in zip(cases, json.loads(run.stdout.splitlines()[-1])):
        assert touched <= counted, (m, k, threads, touched, counted)
        assert touched >= 0.75 * counted, (m, k, threads, touched, counted)


def test_a_mixed_steps_decode_rows_keep_the_decode_kernels_bits():
    """A step that carries prefill rows and decode rows (the runner puts the decode rows first): the decode rows
    get the bits a pure decode step gives them (the AVX-512 kernel on those rows alone), the prefill rows the
    chosen kernel's; in the MLP's row blocks (`rows_from`) only the block holding them is split."""
    need_amx()
    lin = make_linear(300, 1024, True, BF16, seed=11)  # K = 1024: the two kernels' bits differ somewhere
    mod = BlockedLinear(lin)
    x = torch.randn(200, 1024, generator=torch.Generator().manual_seed(12)).to(BF16)
    large_m.force("amx")
    on_amx = amx(mod, x)
    for d in (1, 5, 63, 64, 70):
        alone = mod(x[:d])  # a pure decode step of these d rows (no prefill step: the decode kernel)
        with large_m.prefill_step(True, decode_rows=d):
            got = mod(x)
            assert large_m.decode_rows(200) == d
            with large_m.rows_from(d):  # a block after the decode rows: all on AMX
                assert large_m.decode_rows(50) == 0
                assert torch.equal(mod(x[d:]), on_amx[d:])
            with large_m.rows_from(d - 1):  # a block that starts one row before the last decode row
                assert torch.equal(mod(x[d - 1:])[:1], alone[d - 1:])
        assert torch.equal(got[:d], alone), d
        assert torch.equal(got[d:], on_amx[d:]), d
        assert not torch.equal(alone, on_amx[:d]) or d < 63  # the split matters: the kernels' bits differ
    with large_m.prefill_step(False, decode_rows=10):  # no prefill rows: nothing to split
        assert large_m.decode_rows(100) == 0
