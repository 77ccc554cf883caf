"""Bf16UpcastLinear (kernels/upcast.py): bf16 linears in float32 on a CPU without a native bf16 multiply.

Every test skips where the path is off (a core with avx512_bf16 or AMX runs memfit's AVX-512 kernels instead)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.llm.kernels import upcast
from memfit.llm.kernels.avx2_build import load_avx2
from tests.llm.kernels.common import make_linear

pytestmark = pytest.mark.skipif(not upcast.available(), reason="the CPU has a native bf16 multiply (or no AVX2 + FMA)")


def _within_bf16_rounding(got: torch.Tensor, x: torch.Tensor, lin: nn.Linear) -> tuple[bool, float]:
    """Against the float64 product of the same bf16 values: products of two bf16 values are exact in float32, so
    the error is the one rounding of the result to bf16 (at most 2^-8 of it) plus float32 summation (within
    1e-5 of the sum of |terms| for K up to a few thousand)."""
    b = None if lin.bias is None else lin.bias.double()
    ref = F.linear(x.double(), lin.weight.double(), b)
    scale = F.linear(x.double().abs(), lin.weight.double().abs()) + (0 if b is None else b.abs())
    err = (got.double() - ref).abs()
    return bool((err <= 2 ** -8 * ref.abs() + 1e-5 * scale + 1e-6).all()), err.max().item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k,n", [(1, 5), (7, 45), (77, 300), (200, 257), (768, 64)])  # K % 8 tails, N % 4 and
def test_matches_the_float32_product_of_the_bf16_weights(k, n, bias):  # N % BLOCK_N tails
    lin = make_linear(n, k, bias, torch.bfloat16)
    mod = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(k))
    assert mod.weight.data_ptr() == lin.weight.data_ptr()  # the weight is not copied
    g = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 5, 8, 31, 32, 33, 100, 513):  # both paths, across FEW_ROWS and BLOCK_M
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        got = mod(x)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        ok, err = _within_bf16_rounding(got, x, lin)
        assert ok, f"m={m} max err {err}"
        # aten's bf16 matmul, rounded its own way, meets the same bound: the two differ by at most a rounding
        ok_aten, err_aten = _within_bf16_rounding(F.linear(x, lin.weight, lin.bias), x, lin)
        assert ok_aten, f"aten m={m} max err {err_aten}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("k,n,bias", [(77, 300, True), (200, 257, False), (768, 64, True)])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(k, n, bias):
    """A decode row's result is the same bits whatever the batch it runs in: every few-row call (1..FEW_ROWS rows,
    through the 1-row kernel and the 4-, 2- and 1-row tiles) gives each row what that row alone gives."""
    if load_avx2() is None:
        pytest.skip("the AVX2 kernel can't be built here")
    # Columns 0 and 1 cancel at 2^22, where float32's step is 0.5: the order a row's sum is taken in then shows in
    # its bf16 bits (summing one tile's lanes in another order flipped 17-82 thousand of these outputs); on plain
    # random data the final rounding to bf16 hides such a change.
    lin = make_linear(n, k, bias, torch.bfloat16)
    lin.weight[:, 0], lin.weight[:, 1] = 2.0 ** 22, -2.0 ** 22
    mod = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(k))
    x = torch.randn(upcast.FEW_ROWS, k, generator=torch.Generator().manual_seed(2))
    x[:, :2] = 1.0
    x = x.to(torch.bfloat16)
    alone = torch.cat([mod(x[i:i + 1]) for i in range(x.shape[0])])  # (FEW_ROWS, N), one row a call
    for m in range(2, upcast.FEW_ROWS + 1):
        assert torch.equal(_bits(mod(x[:m])), _bits(alone[:m])), f"m={m}"


def test_bf16_x_in_place_of_a_float32_copy_strided_rows_and_an_output_region():
    """x goes to the kernel as bf16 with its own row stride (no float32 copy made in Python), and a caller's output
    region (models/llama.py's step arena) is written in place: the same bits as a contiguous x into a new tensor."""
    if load_avx2() is None:
        pytest.skip("the AVX2 kernel can't be built here")
    lin = make_linear(45, 70, True, torch.bfloat16)
    mod = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(70))
    assert mod.takes_out
    wide = torch.randn(8, 100).to(torch.bfloat16)
    x = wide[:, 10:80]  # (8, 70), rows 100 apart
    want = mod(x.contiguous())
    assert _within_bf16_rounding(want, x, lin)[0]
    assert torch.equal(_bits(mod(x)), _bits(want))
    region = torch.full((8, 60), 7.0, dtype=torch.bfloat16)[:, 5:50]  # (8, 45), row stride 60
    got = mod(x, out=region)
    assert got.data_ptr() == region.data_ptr() and torch.equal(_bits(region), _bits(want))
    assert torch.equal(_bits(mod(x.t().contiguous().t())), _bits(want))  # columns unit-stride: made contiguous
    wrong = torch.empty(8, 44, dtype=torch.bfloat16)  # not this call's shape: y is made as usual, `wrong` untouched
    assert mod(x, out=wrong).shape == (8, 45)


def test_few_rows_without_the_avx2_kernel_fall_back_to_aten():
    lin = make_linear(40, 24, True, torch.bfloat16)
    mod = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(24))
    x = torch.randn(3, 24).to(torch.bfloat16)
    mod._lib = None
    torch.testing.assert_close(mod(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)


def test_rounding_to_bf16_is_to_nearest_even():
    if load_avx2() is None:
        pytest.skip("the AVX2 kernel can't be built here")
    # 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: even (1.0) wins; 1 + 3 x 2^-8 -> 1 + 2^-6
    lin = nn.Linear(2, 2, bias=False).to(torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(torch.tensor([[1.0, 2.0 ** -8], [1.0, 3 * 2.0 ** -8]]))
    y = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(2))(torch.ones(1, 2, dtype=torch.bfloat16))
    assert y.tolist() == [[1.0, 1.0 + 2.0 ** -6]]


def test_batch_dims_strided_rows_and_grad_mode():
    lin = make_linear(24, 70, True, torch.bfloat16)
    mod = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(70))
    x = torch.randn(40, 100).to(torch.bfloat16)[:, 10:80]  # rows 100 apart
    assert _within_bf16_rounding(mod(x), x, lin)[0]
    x3 = torch.randn(2, 20, 70).to(torch.bfloat16)  # (B, T, K): 40 rows, the many-row path
    assert mod(x3).shape == (2, 20, 24)
    assert mod(torch.empty(0, 70, dtype=torch.bfloat16)).shape == (0, 24)
    with pytest.raises(ValueError, match="bf16"):
        upcast.Bf16UpcastLinear(make_linear(4, 4, False, torch.float32), upcast.UpcastScratch(4))


def _resident_bytes_of_mapping(address: int) -> int:
    """Rss of the mapping holding `address`, from the kernel's /proc/self/smaps (not from anything we count)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.mark.parametrize("rows", [100, 1100])  # one pass; three passes of BLOCK_M rows
def test_scratch_stays_within_its_bound(rows):
    # a model's linears of two K share one scratch: what the kernel maps in stays within scratch_bytes(k_max,
    # rows), the figure the engine's ledger counts, whatever the order of the calls
    k_max = 600
    scratch = upcast.UpcastScratch(k_max)
    mods = [upcast.Bf16UpcastLinear(make_linear(n, k, True, torch.bfloat16), scratch) for n, k in ((700, 200), (300, k_max))]
    for m in (rows, 40, rows // 2):
        for mod in mods:
            mod(torch.randn(m, mod.in_features).to(torch.bfloat16))
    resident = _resident_bytes_of_mapping(scratch._flat.data_ptr())
    bound = upcast.scratch_bytes(k_max, rows)
    assert 0.5 * bound < resident <= bound + 4096, (resident, bound)
    if rows > upcast.BLOCK_M:
        assert bound == upcast.scratch_bytes(k_max, upcast.BLOCK_M)  # fixed: the rows go in blocks


def test_few_rows_use_no_scratch():
    scratch = upcast.UpcastScratch(64)
    mod = upcast.Bf16UpcastLinear(make_linear(64, 64, False, torch.bfloat16), scratch)
    mod(torch.randn(upcast.FEW_ROWS, 64).to(torch.bfloat16))
    assert scratch._flat is None and upcast.scratch_bytes(64, upcast.FEW_ROWS) == 0


def test_the_engine_ledger_counts_the_scratch():
    from memfit.llm.engine import accounting
    from memfit.llm.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    got = accounting.matmul_scratch_bytes(cfg, torch.bfloat16, 512)
    assert got == upcast.scratch_bytes(352, 512) > 0
    assert accounting.matmul_scratch_bytes(cfg, torch.float32, 512) == 0


def test_use_upcast_linears_shares_one_scratch_and_keeps_the_weights():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False)).to(torch.bfloat16)
    ptrs = [model[0].weight.data_ptr(), model[2].weight.data_ptr()]
    x = torch.randn(50, 32).to(torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        assert upcast.use_upcast_linears(model) == 2
        got = model(x)
    assert isinstance(model[0], upcast.Bf16UpcastLinear) and model[0].scratch is model[2].scratch
    assert [model[0].weight.data_ptr(), model[2].weight.data_ptr()] == ptrs
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    assert upcast.use_upcast_linears(nn.Sequential(nn.Linear(4, 4))) == 0  # float32: not this path


def test_a_missing_source_turns_into_the_aten_fallback(monkeypatch, tmp_path):
    from memfit.llm.kernels import avx2_build

    monkeypatch.setattr(avx2_build, "SOURCE", tmp_path / "absent.cpp")
    assert avx2_build.load_avx2() is None and "missing" in avx2_build.reason
    lin = make_linear(12, 16, True, torch.bfloat16)
    mod = upcast.Bf16UpcastLinear(lin, upcast.UpcastScratch(16))
    x = torch.randn(2, 16).to(torch.bfloat16)
    torch.testing.assert_close(mod(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)


_SWEEP = r"""
import ctypes, gc, json, sys
import torch
torch.set_num_threads(1)
from memfit.llm.engine import accounting, fallback_accounting
from memfit.llm.kernels.upcast import Bf16UpcastLinear, UpcastScratch
from memfit.llm.models.config import ModelConfig
from memfit.memory.measure import status_bytes

libc = ctypes.CDLL(None)
cfg = ModelConfig.from_dir("memfit/assets/models/memfit-tiny")
mats = sorted(set(accounting.linear_shapes(cfg, fused=True)))  # (out, in): qkv, o, gate|up, down, head
scratch = UpcastScratch(max(k for _, k in mats))
lins = [Bf16UpcastLinear(torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16), scratch) for n, k in mats]
rows = int(sys.argv[1])
xs = {k: torch.randn(rows, k).to(torch.bfloat16) for _, k in mats}

def held():
    gc.collect()
    libc.malloc_trim(0)  # freed pages are not what this measures: what stays allocated per shape is
    return status_bytes()["RssAnon"]

with torch.inference_mode():
    for lin in lins:  # both paths once, at the most rows: the scratch and the code are set up
        lin(xs[lin.in_features][:1]), lin(xs[lin.in_features])
    before = held()
    for m in range(1, rows + 1):
        for lin in lins:
            lin(xs[lin.in_features][:m])
print(json.dumps({"anon": held() - before, "onednn_term": fallback_accounting.shape_cache_bytes(cfg, "onednn", rows),
                  "upcast_term": fallback_accounting.shape_cache_bytes(cfg, "upcast", rows)}))
"""


def test_nothing_is_kept_per_row_count():
    """The ledger charges the upcast path no per-shape kernels (fallback_accounting.shape_cache_bytes is 0 for it,
    where oneDNN's is ~49 MiB for memfit-tiny): a fresh process calling memfit-tiny's five matrices at every row
    count 1..160 keeps under 1 MiB more anonymous memory (the kernel's count, after trimming freed pages)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", _SWEEP, "160"], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["upcast_term"] == 0 and r["onednn_term"] > 16 * 2**20, r
    assert r["anon"] <= 1 * 2**20, r
