"""memfit's row-major CPU linear kernel: results against F.linear, the build cache, and the fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.llm.kernels import build
from memfit.llm.kernels.linear import RowMajorLinear, use_row_major_linears
from tests.llm.kernels.common import make_linear, need


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 31, 77, 200])  # not multiples of 32/64: every masked-tail path
def test_matches_f_linear(dtype, bias, k):
    need(dtype)
    n = 45  # not a multiple of the 8-row blocks
    lin = make_linear(n, k, bias, dtype)
    mod = RowMajorLinear(lin, max_rows=128)
    assert mod.weight.data_ptr() == lin.weight.data_ptr()  # zero-copy
    g = torch.Generator().manual_seed(1)
    for m in list(range(1, 11)) + [15, 16, 17, 33, 64, 70]:
        x = torch.randn(m, k, generator=g).to(dtype)
        ref = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
        got = mod(x)
        assert got.dtype == dtype and got.shape == (m, n)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), ref, atol=1e-4 * (k ** 0.5), rtol=1e-5)
        else:
            # products of bf16 values are exact in fp32; the error is the final rounding to bf16 plus the
            # fp32 summation: relative to the magnitude of the sum of |terms|
            scale = F.linear(x.double().abs(), lin.weight.double().abs()) + (0 if lin.bias is None else lin.bias.double().abs())
            err = (got.double() - ref).abs()
            assert (err <= 2 ** -8 * ref.abs() + 1e-5 * scale + 1e-6).all(), f"m={m} max err {err.max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_and_batch_dims(dtype):
    need(dtype)
    lin = make_linear(24, 70, True, dtype)
    mod = RowMajorLinear(lin)
    big = torch.randn(5, 100).to(dtype)
    x = big[:, 10:80]  # rows 100 apart, last dim contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(mod(x).float(), F.linear(x, lin.weight, lin.bias).float(), atol=0.05, rtol=0.02)
    x3 = torch.randn(2, 3, 70).to(dtype)  # (B, T, K)
    assert mod(x3).shape == (2, 3, 24)
    torch.testing.assert_close(mod(x3).float(), F.linear(x3, lin.weight, lin.bias).float(), atol=0.05, rtol=0.02)
    xt = torch.randn(70, 4).to(dtype).t()  # last dim not contiguous: copied, still right
    torch.testing.assert_close(mod(xt).float(), F.linear(xt, lin.weight, lin.bias).float(), atol=0.05, rtol=0.02)


def test_exact_bf16_rounding_of_known_values():
    need(torch.bfloat16)
    # one row, K=2: y = 1*1 + 2^-8 * 1 = 1 + 2^-8, exactly halfway between two bf16 values: even wins (1.0)
    lin = nn.Linear(2, 2, bias=False).to(torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(torch.tensor([[1.0, 2.0 ** -8], [1.0, 3 * 2.0 ** -8]]))
    y = RowMajorLinear(lin)(torch.ones(1, 2, dtype=torch.bfloat16))
    assert y.tolist() == [[1.0, 1.015625]]  # 1 + 3*2^-8 rounds up to 1 + 2^-6


def test_large_inputs_and_grad_go_to_f_linear():
    need(torch.float32)
    lin = make_linear(8, 16, True, torch.float32)
    mod = RowMajorLinear(lin, max_rows=4)
    x = torch.randn(9, 16)
    torch.testing.assert_close(mod(x), F.linear(x, lin.weight, lin.bias))
    xg = torch.randn(2, 16, requires_grad=True)
    mod(xg).sum().backward()  # autograd works through the F.linear path
    assert xg.grad is not None


def test_wraps_every_linear_without_copies():
    need(torch.float32)
    from tests.llm.models.test_packing import tiny

    model = tiny(tie=True, dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        ref = model.dense_logits(ids)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    n = use_row_major_linears(model)
    assert n > 0
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head still shares its matrix
    with torch.no_grad():
        torch.testing.assert_close(model.dense_logits(ids), ref, atol=1e-4, rtol=1e-4)


def test_build_cache_is_reused():
    need(torch.float32)
    # Earlier tests (the engine's) may have loaded the library from another cache directory in this process:
    # forget it, so this load goes through the test's own cache (building into it if it is empty).
    build._forget_loaded()
    assert build.load_cpu_linear() is not None
    before = build.compile_count
    build._forget_loaded()  # as a new process would: only the cache directory remains
    lib = build.load_cpu_linear()
    assert lib is not None and lib.path.parent == build.cache_dir() and lib.path.exists()
    assert build.compile_count == before


def test_availability_checks_read_no_files_once_loaded(monkeypatch):
    # Every decode-mode query asks whether the library is available; that answer must not re-read the sources
    # or /proc/cpuinfo (it cost 0.2-0.9 ms a call when it did).
    need(torch.float32)
    assert build.load_cpu_linear() is not None
    build.cpu_flags()

    def no_reads(*args, **kwargs):
        raise AssertionError("a file was read by an availability check")

    monkeypatch.setattr(build.Path, "read_bytes", no_reads)
    monkeypatch.setattr("builtins.open", no_reads)
    assert build.unavailable_reason(torch.float32) is None
    assert build.load_cpu_linear() is not None


def test_the_key_follows_the_compiler_without_forgetting(monkeypatch):
    # The remembered key is per compiler setting: pointing CXX at a missing compiler mid-process makes the
    # library unavailable, and restoring it gives the same library back without a compile.
    need(torch.float32)
    lib = build.load_cpu_linear()
    assert lib is not None
    before = build.compile_count
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert build.load_cpu_linear() is None and "compiler" in build.unavailable_reason(torch.float32)
    monkeypatch.undo()
    assert build.load_cpu_linear() is lib and build.compile_count == before


def test_broken_compiler_gives_none_and_engine_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path / "fresh"))  # nothing cached for this compiler
    build._forget_loaded()
    try:
        assert build.load_cpu_linear() is None
        assert build.get_cpu_linear(torch.float32) is None
        reason = build.unavailable_reason(torch.float32)
        assert reason is not None and ("failed" in reason or "lacks" in reason)
        from memfit.llm.engine.llm_engine import LLMEngine
        from memfit.llm.models.packing import can_pack_for_cpu
        from tests.llm.tiny_models import make_tiny_model_dir

        path = make_tiny_model_dir(tmp_path, family="llama")
        eng = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", cpu_linear="memfit")
        assert eng.backends.num_row_major_linears == 0
        assert eng.backends.cpu_linear == ("onednn" if can_pack_for_cpu(eng.dtype) else None)
        eng.close()
    finally:
        build._forget_loaded()


def test_missing_compiler_gives_none(monkeypatch):
    # The compiler's absence is the reason under test, so the CPU is made to have every flag the kernel needs
    # (on a host without AVX-512 the missing flags would otherwise be the reason given first).
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(f for flags in build.NEEDS.values() for f in flags))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    build._forget_loaded()
    try:
        assert build.load_cpu_linear() is None
        assert "compiler" in build.unavailable_reason(torch.float32)
    finally:
        build._forget_loaded()


def _greedy(eng, ids):
    from memfit.llm.engine.params import SamplingParams

    for i in range(3):  # a batch of 3, so decode runs at M = 3 as well as prefill
        eng.add_request(prompt_token_ids=ids[i:], params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    toks = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks[o.request_id] = o.outputs[0].token_ids
    eng.close()
    return [toks[k] for k in sorted(toks)]


def test_engine_memfit_matches_onednn(tmp_path):
    need(torch.float32)
    from memfit.llm.engine.llm_engine import LLMEngine
    from memfit.llm.kernels.linear import RowMajorLinear as RML
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama")
    mine = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", cpu_linear="memfit")
    assert mine.backends.cpu_linear == "memfit" and mine.backends.num_row_major_linears > 0
    assert isinstance(mine.model.lm_head, RML)
    ref = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", cpu_linear="onednn")
    assert ref.backends.num_row_major_linears == 0
    ids = list(range(3, 24))
    assert _greedy(mine, ids) == _greedy(ref, ids)


def test_engine_rejects_unknown_backend(tmp_path):
    from memfit.llm.engine.llm_engine import LLMEngine
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama")
    with pytest.raises(ValueError, match="cpu_linear must be one of"):
        LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", cpu_linear="mkl")


def test_auto_picks_blocked_else_memfit_for_small_batches_and_memfit_keeps_the_mapping(tmp_path, monkeypatch):
    need(torch.float32)
    from memfit.llm.engine import LLMEngine
    from memfit.llm.kernels.backends import AUTO_MEMFIT_MAX_SEQS
    from memfit.llm.kernels import blocked
    from memfit.llm.models.packing import can_pack_for_cpu
    from memfit.memory.pages import file_mappings, is_file_backed
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama")
    auto = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB")
    assert auto.backends.cpu_linear == "blocked" and auto.backends.num_blocked_linears > 0
    auto.close()
    small = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", cpu_linear="memfit")
    assert small.backends.cpu_linear == "memfit" and small.backends.num_fused_layers == 0  # no fusion: no copy
    maps = file_mappings()
    q = small.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, RowMajorLinear) and is_file_backed(q.weight.detach(), maps)  # still the checkpoint's pages
    small.close()
    monkeypatch.setattr(blocked, "can_use_blocked", lambda dtype: False)  # a machine without the blocked kernel
    small = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", max_num_seqs=AUTO_MEMFIT_MAX_SEQS)
    assert small.backends.cpu_linear == "memfit"
    small.close()
    big = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", max_num_seqs=AUTO_MEMFIT_MAX_SEQS + 1)
    assert big.backends.cpu_linear == ("onednn" if can_pack_for_cpu(big.dtype) else None)
    big.close()


_PAST_MAX_ROWS = r"""
import gc, json, torch
torch.set_num_threads(1)
from memfit.llm.kernels.linear import RowMajorLinear
from memfit.memory.measure import heap_in_use_bytes
def used():
    gc.collect()
    return heap_in_use_bytes()
lin = RowMajorLinear(torch.nn.Linear(256, 4096, bias=False).to(torch.bfloat16))  # memfit-tiny's head
x = torch.randn(300, 256).to(torch.bfloat16)
with torch.inference_mode():
    lin(x[:65])
    before = used()
    for m in range(66, 300):
        y = lin(x[:m])
        assert y.shape == (m, 4096)
    print(json.dumps({"heap": used() - before}))
"""


def test_rows_past_max_rows_go_to_oneDNN_in_row_buckets():
    """Past max_rows RowMajorLinear hands the rows to F.linear, whose oneDNN GEMM kept a kernel per row count: over
    row counts 66-299 of memfit-tiny's bf16 head the heap in use grew 124 MiB. In oneDNN's row buckets
    (models/packing.py) at most one kernel a bucket is built: 5.8 MiB measured, bounded here by the 13 buckets at
    the largest kernel size measured on the hosts we know (engine/onednn_kernels.py: 510-700 KiB)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from memfit.llm.models.packing import ROW_BUCKETS

    need(torch.bfloat16)
    out = subprocess.run([sys.executable, "-c", _PAST_MAX_ROWS], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[3], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    heap = json.loads(out.stdout.strip().splitlines()[-1])["heap"]
    assert heap <= len(ROW_BUCKETS) * 700 * 1024 + 2**20, heap / 2**20


def test_rows_past_max_rows_match_f_linear():
    need(torch.bfloat16)
    lin = make_linear(200, 96, True, torch.bfloat16, seed=4)
    mod = RowMajorLinear(lin, max_rows=8)
    x = torch.randn(600, 96).to(torch.bfloat16)
    with torch.inference_mode():
        for m in (9, 65, 257, 600):
            torch.testing.assert_close(mod(x[:m]), F.linear(x[:m], lin.weight, lin.bias), rtol=2e-2, atol=2e-2)
