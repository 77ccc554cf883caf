"""memfit's CPU decode kernels (kernels/decode.py, cpu_decode.cpp) and the one-call decode stack
(kernels/stack.py): each op against the PyTorch reference in memfit.llm.models.ops, attention against a
float64 softmax, and whole engines against the PyTorch path token for token."""
from __future__ import annotations

import math

import pytest
import torch

from memfit.llm.kernels import build
from memfit.llm.models.ops import TorchOps

REF = TorchOps()


def ops_for(dtype: torch.dtype):
    reason = build.unavailable_reason(dtype)
    if reason is not None:
        pytest.skip(f"memfit CPU kernels unavailable for {dtype}: {reason}")
    from memfit.llm.kernels.decode import CpuDecodeOps

    return CpuDecodeOps(dtype)


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's last place at b's magnitude."""
    eps = torch.finfo(b.dtype).eps
    scale = b.float().abs().clamp_min(1e-3) * eps
    return ((a.float() - b.float()).abs() / scale).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [72, 128])  # 72: a 16-lane body plus a scalar tail
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(dtype, width, with_residual, monkeypatch):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, width + 8, generator=g).to(dtype)
    x = wide[:, :width]  # rows with a stride larger than their length
    res = torch.randn(3, width, generator=g).to(dtype) if with_residual else None
    w = torch.rand(width, generator=g).add(0.5).to(dtype)
    h_ref, y_ref = REF.add_rms_norm(x, res, w, 1e-6)
    monkeypatch.setattr(TorchOps, "add_rms_norm", lambda *a: pytest.fail("fell back to PyTorch"))
    h, y = ops.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(h, h_ref)  # the residual add rounds once, identically
    # The float32 sum of squares runs in another order: bf16 outputs within one ulp, fp32 within a few.
    assert ulps(y, y_ref) <= (1.0 if dtype == torch.bfloat16 else 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])  # 16: the scalar path; 64: the vector path
def test_rope_matches_torch_exactly(dtype, head_dim, monkeypatch):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(1)
    n, hq, hkv = 5, 6, 2
    qkv = torch.randn(n, (hq + 2 * hkv) * head_dim, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    q, k = q.view(n, hq, head_dim), k.view(n, hkv, head_dim)  # views into the fused projection, as in the model
    cos = torch.randn(n, 1, head_dim, generator=g).to(dtype)
    sin = torch.randn(n, 1, head_dim, generator=g).to(dtype)
    q_ref, k_ref = REF.rope(q.clone(), k.clone(), cos, sin)
    monkeypatch.setattr(TorchOps, "rope", lambda *a: pytest.fail("fell back to PyTorch"))
    q_out, k_out = ops.rope(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr()  # rotated in place
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype, monkeypatch):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(2)
    from memfit.llm.kernels.decode import SILU_MIN_ROWS

    gate_up = (torch.randn(SILU_MIN_ROWS + 3, 2 * 200, generator=g) * 4).to(dtype)  # 200: 16-lane body + tail
    gate, up = gate_up.chunk(2, dim=-1)
    ref = REF.silu_mul(gate, up)
    monkeypatch.setattr(TorchOps, "silu_mul", lambda *a: pytest.fail("fell back to PyTorch"))
    out = ops.silu_mul(gate, up)
    assert ulps(out, ref) <= (1.0 if dtype == torch.bfloat16 else 8.0)


def test_autograd_inputs_take_the_torch_path():
    ops = ops_for(torch.float32)
    x = torch.randn(2, 32, requires_grad=True)
    w = torch.ones(32)
    _, y = ops.add_rms_norm(x, None, w, 1e-6)
    assert y.grad_fn is not None  # training goes through autograd, not the kernel
    y.sum().backward()
    assert x.grad is not None


def reference_attention(q, k_cache, v_cache, slots, lens, scale, window=None):
    """float64 softmax attention of q (B, Hq, D) over each row's cached prefix."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        t1 = int(lens[i])
        t0 = max(0, t1 - window) if window else 0
        k = k_cache[int(slots[i]), t0:t1].double().repeat_interleave(hq // hkv, dim=1)  # (T, Hq, D)
        v = v_cache[int(slots[i]), t0:t1].double().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,thd->ht", q[i].double(), k) * scale
        out[i] = torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,hq,hkv", [(32, 4, 4), (64, 12, 4), (128, 14, 2)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_matches_float64(dtype, head_dim, hq, hkv, window):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(3)
    slots_total, max_len = 5, 80
    # A per-layer-style cache view: (slots, max_len, Hkv, D) strided inside a larger buffer.
    buf = torch.randn(slots_total, max_len + 3, hkv, head_dim, generator=g).to(dtype)
    k_cache, v_cache = buf[:, :max_len], torch.randn_like(buf)[:, 1:max_len + 1]
    slots = torch.tensor([3, 0, 4], dtype=torch.int64)  # not consecutive, not in order
    lens = torch.tensor([1, 33, 80], dtype=torch.int64)  # 1 token, a 16-token tail, the whole slot
    q = torch.randn(3, hq, head_dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    assert ops.can_attend(q, k_cache)
    out = ops.decode_attention(q, k_cache, v_cache, slots, lens, scale, window)
    ref = reference_attention(q, k_cache, v_cache, slots, lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding (8 bits of mantissa)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_attention_refuses_head_sizes_it_was_not_built_for():
    ops = ops_for(torch.float32)
    assert not ops.can_attend(torch.zeros(1, 4, 48), torch.zeros(2, 8, 4, 48))


def _greedy(engine, prompts, n=12):
    from memfit.llm.engine.params import SamplingParams

    for p in prompts:
        engine.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    toks = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            toks[o.request_id] = o.outputs[0].token_ids
    engine.close()
    return [toks[k] for k in sorted(toks)]


# head_dim 32 (hidden 128, 4 heads): a size the attention kernel and the stack run.
@pytest.mark.parametrize("family,dtype,overrides", [
    ("llama", "float32", {}),
    ("qwen2", "float32", {}),  # q/k/v biases, tied embeddings
    ("llama", "bfloat16", {}),
    ("mistral", "float32", {"sliding_window": 8}),  # the kernel's window
])
def test_engine_kernels_give_the_torch_tokens(tmp_path, family, dtype, overrides):
    ops_for(getattr(torch, dtype))
    from memfit.llm.engine.llm_engine import LLMEngine
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family=family, dtype=dtype, hidden_size=128, **overrides)
    prompts = [list(range(3, 23)), list(range(40, 45)), list(range(7, 40))]
    opts = {"model": str(path), "device": "cpu", "kv_budget": "8MiB"}
    ref = _greedy(LLMEngine(**opts, cpu_kernels=False, cpu_linear="onednn", max_num_seqs=3), prompts)  # PyTorch ops
    blocked = LLMEngine(**opts, cpu_linear="blocked", max_num_seqs=3)
    assert blocked.backends.cpu_linear == "blocked" and blocked.runner.stack is not None and blocked.runner.stack.max_rows >= 3
    assert blocked.backends.num_fused_layers == 2  # q|k|v and gate|up fused before packing: the stack runs fused layers
    assert _greedy(blocked, prompts) == ref  # decode steps of 1-3 rows in one call each
    row_major = LLMEngine(**opts, cpu_linear="memfit", max_num_seqs=1)
    assert row_major.runner.stack is not None and row_major.runner.stack.max_rows == 2
    assert _greedy(row_major, prompts) == ref
    op_by_op = LLMEngine(**opts, cpu_linear="onednn", max_num_seqs=3)
    assert op_by_op.backends.cpu_kernels and op_by_op.runner.stack is None  # kernels op by op between oneDNN matmuls
    assert _greedy(op_by_op, prompts) == ref


def test_stack_declines_what_it_cannot_run(tmp_path):
    ops_for(torch.float32)
    from memfit.llm.engine.llm_engine import LLMEngine
    from memfit.llm.kernels.stack import CpuDecodeStack
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama", hidden_size=128)
    paged = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", kv_cache="paged", block_size=12, max_num_seqs=1)
    assert paged.backends.cpu_kernels  # the op kernels still run; attention goes through the paged cache's gather
    assert paged.runner.stack is None and "power of two" in CpuDecodeStack.unsupported(paged.model, paged.kv)
    paged.close()
    small_heads = make_tiny_model_dir(tmp_path, family="llama")  # head_dim 16
    eng = LLMEngine(model=str(small_heads), device="cpu", kv_budget="8MiB", max_num_seqs=1)
    assert eng.runner.stack is None and "head_dim 16" in CpuDecodeStack.unsupported(eng.model, eng.kv)
    with pytest.raises(RuntimeError, match="can't run this model"):
        CpuDecodeStack(eng.model, eng.kv)
    eng.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_writes_the_new_rows_first(dtype):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(4)
    hq, hkv, d = 8, 2, 64
    k_cache = torch.randn(3, 40, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(3, 40, hkv, d, generator=g).to(dtype)
    slots, lens = torch.tensor([2, 0], dtype=torch.int64), torch.tensor([17, 33], dtype=torch.int64)
    kv_new = torch.randn(2, 2 * hkv * d, generator=g).to(dtype)  # fused (B, 2 * Hkv * D), as a k/v split gives
    k_new, v_new = (t.view(2, hkv, d) for t in kv_new.split(hkv * d, dim=-1))
    q = torch.randn(2, hq, d, generator=g).to(dtype)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for i in range(2):
        expect_k[slots[i], lens[i] - 1] = k_new[i]
        expect_v[slots[i], lens[i] - 1] = v_new[i]
    out = ops.decode_attention(q, k_cache, v_cache, slots, lens, 0.125, k_new=k_new, v_new=v_new)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)  # exactly those rows changed
    ref = reference_attention(q, expect_k, expect_v, slots, lens, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_first_index_among_ties(dtype):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 1000 + 7, generator=g).to(dtype)  # a 16-lane body plus a tail
    logits[1, 20] = logits[1, 900] = 50.0  # a tie across lanes: the first index wins
    logits[2, 1005] = 60.0  # the maximum in the tail
    logits[3] = float("-inf")  # all -inf: index 0, as torch gives
    logits[4, 3] = logits[4, 19] = 70.0  # a tie in one lane
    expect = REF.argmax(logits)
    assert torch.equal(ops.argmax(logits), expect)
    assert ops.argmax(logits)[1] == 20 and ops.argmax(logits)[2] == 1005 and ops.argmax(logits)[3] == 0
    short = torch.randn(2, 9, generator=g).to(dtype)  # shorter than one vector
    assert torch.equal(ops.argmax(short), REF.argmax(short))


def test_one_pass_default_follows_the_cpu_vendor():
    # cpu_decode.cpp reads CPUID's vendor and sysconf's L2 size; /proc/cpuinfo and sysfs are the kernel's own
    # readings of the same, read here independently.
    ops_for(torch.float32)
    from memfit.llm.kernels.decode import by_seq_default

    try:
        vendors = {line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id")}
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if len(vendors) != 1:
        pytest.skip(f"vendor_id not one value: {vendors}")
    row = 8 * 64 * 2 * 2  # the 1B layer's token: K + V of 8 heads of 64, bf16
    if vendors != {"GenuineIntel"}:
        assert by_seq_default(row) == (24 << 20, 256)
        return
    try:
        size = open("/sys/devices/system/cpu/cpu0/cache/index2/size").read().strip()
    except OSError:
        pytest.skip("no sysfs cache size")
    l2 = int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    assert by_seq_default(row) == (0, max(256, l2 * 5 // 4 // row + 1))
    assert by_seq_default(1 << 30) == (0, 256)  # rows past the L2 alone: the floor
