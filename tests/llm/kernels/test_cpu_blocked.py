"""memfit's blocked CPU matmul (cpu_blocked.cpp via BlockedLinear): results against F.linear, packing, model use."""
from __future__ import annotations

import ctypes
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.llm.kernels.blocked import BlockedLinear
from memfit.llm.kernels.blocked_model import use_blocked_linears
from tests.llm.kernels.common import make_linear, need

ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64]





def check(got: torch.Tensor, x: torch.Tensor, lin: nn.Linear) -> None:
    """fp32: within 1e-5 of the sum of |terms|. bf16: F.linear in fp32 on the same bf16 values, then
    rounded: the kernel may differ by the fp32 summation order, i.e. at most about one bf16 ulp."""
    w, b = lin.weight.float(), None if lin.bias is None else lin.bias.float()
    ref = F.linear(x.float(), w, b)  # (M, N) fp32
    scale = F.linear(x.float().abs(), w.abs()) + (0 if b is None else b.abs())
    err = (got.float() - ref).abs()
    if got.dtype == torch.float32:
        bound = 1e-5 * scale + 1e-6
    else:
        bound = 2.0 ** -7 * ref.abs() + 1e-5 * scale + 1e-6
    assert (err <= bound).all(), f"max err {err.max().item()} (M={x.shape[0]})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(77, 45), (130, 201), (16, 1)])  # tails: N not a multiple of 64, odd K
def test_matches_f_linear(dtype, bias, n, k):
    need(dtype)
    lin = make_linear(n, k, bias, dtype)
    mod = BlockedLinear(lin)
    g = torch.Generator().manual_seed(1)
    for m in ROWS:
        wide = torch.randn(m, k + 9, generator=g).to(dtype)
        x = wide[:, 3:3 + k]  # rows k + 9 apart: ldx > K
        for threads in (1, 2):
            mod.nthreads = threads
            got = mod(x)
            assert got.dtype == dtype and got.shape == (m, n)
            check(got, x, lin)
        torch.testing.assert_close(mod(x), mod(x.contiguous()), rtol=0, atol=0)  # stride changes nothing


def _set_large_m(m: int) -> int:
    """Rows from which the kernel takes its many-row path (run_large); returns the previous threshold."""
    from memfit.llm.kernels.build import load_cpu_linear

    fn = load_cpu_linear().cdll.memfit_blocked_set_large_m
    fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_int64
    return int(fn(m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,bias", [(130, 1024, True), (64, 256, False), (77, 46, True), (200, 45, False)])
def test_many_rows_match_f_linear_and_the_packed_path(dtype, n, k, bias):
    """Prefill-sized inputs (>= 64 rows) take run_large: x read in place, blocked over M (K = 1024 makes
    blocks of 64 bf16 / 30 fp32 rows, so 197 rows span several with a ragged last tile). Odd K (45) keeps the
    packed path. Both paths must give F.linear's result; in fp32 they sum in the same order, so they agree
    bit for bit, in bf16 after the same rounding too."""
    need(dtype)
    lin = make_linear(n, k, bias, dtype, seed=3)
    mod = BlockedLinear(lin)
    g = torch.Generator().manual_seed(2)
    for m in (64, 65, 71, 197):
        wide = torch.randn(m, k + 5, generator=g).to(dtype)
        x = wide[:, 2:2 + k]  # ldx > K
        for threads in (1, 2):
            mod.nthreads = threads
            got = mod(x)
            check(got, x, lin)
            old = _set_large_m(1 << 40)  # the packed (decode) path on the same input
            try:
                packed = mod(x)
            finally:
                _set_large_m(old)
            torch.testing.assert_close(got, packed, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nb", [32, 48, 64])
def test_panel_widths_and_round_trip(dtype, nb):
    need(dtype)
    lin = make_linear(99, 67, True, dtype)
    mod = BlockedLinear(lin, nb=nb)
    assert torch.equal(mod.unpack_weight(), lin.weight)  # pack/unpack is lossless
    x = torch.randn(13, 67).to(dtype)
    check(mod(x), x, lin)


def test_keeps_no_reference_to_the_weight():
    need(torch.float32)
    lin = make_linear(40, 24, True, torch.float32)
    mod = BlockedLinear(lin)
    assert not any(t.untyped_storage().data_ptr() == lin.weight.untyped_storage().data_ptr()
                   for t in [mod.packed, mod.bias, *mod.parameters(), *mod.buffers()])
    assert mod.packed.numel() == 64 * 24  # one panel of 64 columns (40 real, 24 zero)


def test_exact_bf16_rounding_of_known_values():
    need(torch.bfloat16)
    # y0 = 1 + 2^-8: halfway between two bf16 values, even wins (1.0); y1 = 1 + 3 * 2^-8 rounds up
    lin = nn.Linear(2, 2, bias=False).to(torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(torch.tensor([[1.0, 2.0 ** -8], [1.0, 3 * 2.0 ** -8]]))
    y = BlockedLinear(lin)(torch.ones(1, 2, dtype=torch.bfloat16))
    assert y.tolist() == [[1.0, 1.015625]]


def test_batch_dims_transposed_input_and_empty():
    need(torch.float32)
    lin = make_linear(24, 70, True, torch.float32)
    mod = BlockedLinear(lin)
    x3 = torch.randn(2, 3, 70)  # (B, T, K)
    assert mod(x3).shape == (2, 3, 24)
    torch.testing.assert_close(mod(x3), F.linear(x3, lin.weight, lin.bias))
    xt = torch.randn(70, 4).t()  # last dim not contiguous: copied, still right
    torch.testing.assert_close(mod(xt), F.linear(xt, lin.weight, lin.bias))
    assert mod(torch.randn(0, 70)).shape == (0, 24)


def test_bad_inputs_give_clear_errors():
    need(torch.float32)
    mod = BlockedLinear(make_linear(8, 16, False, torch.float32))
    with pytest.raises(TypeError, match="float32"):
        mod(torch.randn(2, 16).to(torch.bfloat16))
    with pytest.raises(ValueError, match="16 features"):
        mod(torch.randn(2, 15))
    with pytest.raises(ValueError, match="nb must be"):
        BlockedLinear(make_linear(8, 16, False, torch.float32), nb=40)


def test_autograd_falls_back_to_f_linear():
    need(torch.float32)
    lin = make_linear(8, 16, True, torch.float32)
    mod = BlockedLinear(lin)
    xg = torch.randn(3, 16, requires_grad=True)
    mod(xg).sum().backward()
    torch.testing.assert_close(xg.grad, lin.weight.sum(0).expand(3, 16))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("tie", [False, True])
def test_model_matches_and_tied_head_is_left_alone(dtype, tol, tie):
    need(dtype)
    from memfit.llm.kernels.linear import RowMajorLinear, use_row_major_linears
    from tests.llm.models.test_packing import tiny

    model = tiny(tie=tie, dtype=dtype)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model.dense_logits(ids).float()
        n = use_blocked_linears(model)
        assert n == 2 * 7 + (0 if tie else 1)  # q, k, v, o, gate, up, down per layer (+ an untied lm_head)
        if tie:
            assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
            assert use_row_major_linears(model) == 1 and isinstance(model.lm_head, RowMajorLinear)
        assert not any(type(m) is nn.Linear for m in model.modules())
        got = model.dense_logits(ids).float()
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item() / 10)


def test_engine_packs_a_mapped_tied_head_and_looks_tokens_up_in_it(tmp_path):
    need(torch.float32)
    from memfit.llm.engine.llm_engine import LLMEngine
    from memfit.llm.engine.params import SamplingParams
    from memfit.memory.pages import file_mappings, is_file_backed
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="qwen2")  # tied embeddings, saved in the dtype it runs in
    tokens = []
    for backend in ("blocked", "onednn"):
        eng = LLMEngine(model=str(path), device="cpu", kv_budget="8MiB", cpu_linear=backend, max_num_seqs=2)
        if backend == "blocked":
            from memfit.llm.kernels.blocked import BlockedEmbedding

            assert isinstance(eng.model.lm_head, BlockedLinear)  # the head packed ...
            emb = eng.model.model.embed_tokens
            assert isinstance(emb, BlockedEmbedding) and emb.head is eng.model.lm_head  # ... and looked up in
            # no parameter of the engine's model is the mapped matrix any more: it is held once, packed
            assert not any(is_file_backed(p.detach(), file_mappings()) and p.numel() == emb.num_embeddings * emb.embedding_dim
                           for p in eng.model.parameters())
        for p in ([5, 6, 7, 8], [40, 41]):
            eng.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        out = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                out[o.request_id] = o.outputs[0].token_ids
        eng.close()
        tokens.append([out[k] for k in sorted(out)])
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_blocked_puts_every_weight_in_one_arena(dtype):
    need(dtype)
    from memfit.llm.kernels.blocked import pack_blocked

    lins = [make_linear(n, k, bias, dtype) for n, k, bias in [(70, 33, True), (128, 64, False), (5, 200, True)]]
    mods = pack_blocked(lins)
    x = {k: torch.randn(6, k).to(dtype) for k in (33, 64, 200)}
    for lin, mod in zip(lins, mods):  # the same results as a module packed into memory of its own
        assert torch.equal(mod(x[lin.in_features]), BlockedLinear(lin)(x[lin.in_features]))
    starts = [m.packed.data_ptr() for m in mods]
    ends = [m.packed.data_ptr() + m.packed.numel() * m.packed.element_size() for m in mods]
    assert starts[0] % (2 << 20) == 0  # the arena's 2 MiB-aligned start
    assert all(0 <= starts[i + 1] - ends[i] < 64 for i in range(2))  # back to back, in order, 64-byte aligned


def test_out_must_fit_the_packed_form():
    need(torch.float32)
    lin = make_linear(8, 16, False, torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        BlockedLinear(lin, out=torch.empty(7))
    with pytest.raises(ValueError, match="out must be"):
        BlockedLinear(lin, out=torch.empty(64 * 16, dtype=torch.bfloat16))
    mod = BlockedLinear(lin, out=torch.empty(64 * 16))  # N = 8 padded to one 64-column panel
    x = torch.randn(3, 16)
    check(mod(x), x, lin)


def test_model_linears_share_one_arena():
    need(torch.float32)
    from tests.llm.models.test_packing import tiny

    model = tiny(tie=False, dtype=torch.float32)
    with torch.no_grad():
        use_blocked_linears(model)
    spans = sorted((m.packed.data_ptr(), m.packed.data_ptr() + m.packed.numel() * 4)
                   for m in model.modules() if isinstance(m, BlockedLinear))
    assert len(spans) == 15 and spans[0][0] % (2 << 20) == 0
    assert all(0 <= b[0] - a[1] < 64 for a, b in itertools.pairwise(spans))  # one contiguous range


@pytest.mark.parametrize("nb,bf16", [(64, 1), (48, 1), (32, 1), (64, 0)])
def test_many_row_blocks_are_balanced_whole_tiles_with_no_small_remainder(nb, bf16):
    """run_large's row blocks (blocked_large.h, large_blocks): they tile [0, M) in order, each a whole number of row
    tiles but the last, at most the L2-sized block, as few as that size allows, and within two tiles of each other:
    no block of a few rows left over to stream the whole weight matrix for next to no arithmetic."""
    from memfit.llm.kernels.build import load_cpu_linear

    if load_cpu_linear() is None:
        pytest.skip("memfit's CPU kernels are unavailable here")
    fn = load_cpu_linear().cdll.memfit_blocked_row_blocks
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    fn.restype = ctypes.c_int64
    mrx = {64: 6, 48: 8, 32: 12}[nb]
    item = 2 if bf16 else 4
    buf = (ctypes.c_int64 * 512)()
    for k in (768, 2048, 4864):
        mb = max(131072 // (k * item) // mrx * mrx, 4 * mrx)  # BLK_MB_BYTES of x, whole tiles, at least four
        for m in range(1, 1200):
            n = fn(m, k, nb, bf16, buf, 512)
            starts = list(buf[:n])
            sizes = [b - a for a, b in zip(starts, starts[1:])]
            assert starts[0] == 0 and starts[-1] == m and all(s > 0 for s in sizes), (m, k, starts)
            assert len(sizes) == -(-m // mb) and max(sizes) <= mb, (m, k, sizes)
            assert all(s % mrx == 0 for s in sizes[:-1]), (m, k, sizes)
            assert max(sizes) - min(sizes) < 2 * mrx, (m, k, sizes)
    assert fn(10, 768, 40, 1, buf, 512) == -1
