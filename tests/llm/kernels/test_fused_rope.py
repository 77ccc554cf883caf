"""The attention's q/k/v matmul with the rotary embedding in its store (blocked_large.h's store_rope_panel, through
BlockedLinear.rope_rows and models/llama.py's Attention): the same bits as the path it replaces (the AVX-512 kernel's
matmul, then CpuDecodeOps' rope kernel over q's and k's columns), v's columns untouched, and taken only where that
path would run every row on the AVX-512 many-row kernel."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.kernels import large_m
from memfit.llm.kernels.blocked import LARGE_M, BlockedLinear, blocked_linear_rope
from memfit.llm.kernels.decode import CpuDecodeOps
from memfit.llm.models.config import ModelConfig
from memfit.llm.models.llama import RotaryEmbedding
from tests.llm.kernels.common import make_linear, need

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("fresh_large_m_choices")


def tables(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row m's cos and signed sin at random positions (as RopeAt gathers them): (M, 64) each, and the positions."""
    cfg = ModelConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=4096, head_dim=64)
    cos, sin = RotaryEmbedding(cfg).tables(torch.device("cpu"), BF16)
    pos = torch.randint(0, 4096, (m,), generator=torch.Generator().manual_seed(seed))
    return cos[pos].contiguous(), sin[pos].contiguous(), pos


def reference(mod: BlockedLinear, x: torch.Tensor, cos, sin, hq: int, hkv: int) -> torch.Tensor:
    """The unfused path: the matmul on the AVX-512 kernel, then the rope kernel in place on q's and k's heads."""
    with large_m.prefill_step():
        y = mod(x)
    q = y[:, : hq * 64].view(-1, hq, 64)
    k = y[:, hq * 64 : (hq + hkv) * 64].view(-1, hkv, 64)
    ops = CpuDecodeOps(BF16)
    q2, k2 = ops.rope(q, k, cos.unsqueeze(1), sin.unsqueeze(1))
    assert q2.data_ptr() == q.data_ptr()  # the kernel ran (in place), not PyTorch's fallback
    return y


@pytest.mark.parametrize("hq,hkv,k,m,bias", [(12, 4, 768, 2048, False), (12, 4, 768, 300, True), (2, 1, 128, 64, False),
                                             (14, 2, 896, 77, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_rope_has_the_unfused_paths_bits(hq, hkv, k, m, bias, threads):
    """The 0.1b shape's 2048-row step and a 300-row one (several row blocks, a ragged last tile), the fewest rows the
    kernel takes, 0.5b's 14 over 2 heads; with and without bias, 1 and 2 threads."""
    need(BF16)
    large_m.force("avx512")
    n = (hq + 2 * hkv) * 64
    lin = make_linear(n, k, bias, BF16, seed=3)
    mod = BlockedLinear(lin, nb=64, nthreads=threads)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(BF16)
    cos, sin, _ = tables(m, m + 1)
    want = reference(mod, x, cos, sin, hq, hkv)
    with large_m.prefill_step():
        got = mod.rope_rows(x, None, cos, sin, (hq + hkv) * 64)
    assert got is not None
    assert torch.equal(got, want)
    plain = mod(x)  # v's columns are the plain matmul's; q's are not (the rotation moved them)
    assert torch.equal(got[:, (hq + hkv) * 64 :], plain[:, (hq + hkv) * 64 :])
    assert not torch.equal(got[:, : hq * 64], plain[:, : hq * 64])


def test_fused_rope_declines_what_the_unfused_path_runs_elsewhere():
    """Under LARGE_M rows (the decode-sized kernel), nb other than 64, tables of another shape, q/k columns that are
    not whole heads, float32: None, nothing computed (the caller runs matmul + rope)."""
    need(BF16)
    large_m.force("avx512")
    lin = make_linear(20 * 64, 768, False, BF16, seed=5)
    mod = BlockedLinear(lin, nb=64)
    cos, sin, _ = tables(LARGE_M, 9)
    x = torch.randn(LARGE_M, 768).to(BF16)
    with large_m.prefill_step():
        assert mod.rope_rows(x, None, cos, sin, 16 * 64) is not None
        assert mod.rope_rows(x[: LARGE_M - 1], None, cos[: LARGE_M - 1], sin[: LARGE_M - 1], 16 * 64) is None
        assert mod.rope_rows(x, None, cos[:, :32], sin[:, :32], 16 * 64) is None
        assert mod.rope_rows(x, None, cos, sin, 16 * 64 + 32) is None
        assert BlockedLinear(lin, nb=48).rope_rows(x, None, cos, sin, 16 * 64) is None
    assert blocked_linear_rope() is not None


class _UnfusedOps(CpuDecodeOps):
    fuses_rope = False  # the model then runs the q/k/v matmul and the rope kernel apart, as before the fusion


def test_the_attention_layer_takes_the_fused_store_with_the_same_bits(monkeypatch):
    """models/llama.py's Attention over a 200-token causal prompt (heads of 64): the fused store where its ops allow
    it, the layer's output bit for bit the unfused one's, and the fused kernel really called (counted)."""
    need(BF16)
    large_m.force("avx512")
    from memfit.llm.kernels.attention import DenseCausalAttention
    from memfit.llm.models.llama import Attention, RopeAt

    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, head_dim=64)
    att = Attention(cfg, 0).to(BF16).requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
    qkv = torch.nn.Linear(256, 512, bias=False).to(BF16).requires_grad_(False)
    qkv.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    att.qkv_proj, att.o_proj = BlockedLinear(qkv, nb=64), BlockedLinear(att.o_proj, nb=64)
    x = torch.randn(200, 256, generator=g).to(BF16)
    positions = torch.arange(200)
    rot = RotaryEmbedding(cfg)
    calls = []
    real = BlockedLinear.rope_rows
    monkeypatch.setattr(BlockedLinear, "rope_rows", lambda self, *a: calls.append(real(self, *a)) or calls[-1])
    dense = DenseCausalAttention([200], cfg.head_dim ** -0.5, None)
    with large_m.prefill_step():
        fused = att(x, rot.at(positions, BF16, CpuDecodeOps(BF16)), dense)
        assert len(calls) == 1 and calls[0] is not None
        plain = att(x, rot.at(positions, BF16, _UnfusedOps(BF16)), dense)
        assert len(calls) == 1  # not asked when the ops' rope is not the kernel's
    assert torch.equal(fused.view(torch.int16), plain.view(torch.int16))
