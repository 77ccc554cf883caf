"""engine/accounting.py: the many-row matmuls' scratch in a step's activations."""
from __future__ import annotations

import torch

from memfit.llm.engine import accounting
from memfit.llm.kernels import large_m, upcast
from memfit.llm.models.config import ModelConfig

CFG = ModelConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000)


def test_activations_count_the_amx_scratch_where_prefill_can_run_on_amx():
    """bf16 on the blocked kernel with AMX: a step's activations hold the AMX kernel's scratch for each distinct K
    (the hidden size's and the MLP's down projection's: a freed block of one may stay a hole the other cannot
    reuse, large_m.amx_scratch_bytes) on every thread; nowhere else is anything added."""
    bf16, threads = torch.bfloat16, torch.get_num_threads()
    block = accounting.BLOCKED_LARGE_M if large_m.amx_linear() is None else 256
    scratch = accounting.matmul_scratch_bytes(CFG, bf16, 512, block)
    if large_m.amx_linear() is None:
        assert scratch == 0
    else:
        assert large_m.amx_scratch_bytes(512, [2048], threads) > 2048 * 256 * 2 * threads
        assert scratch == (large_m.amx_scratch_bytes(512, [768], threads)
                           + large_m.amx_scratch_bytes(512, [2048], threads))  # K = 768 and 2048, one block each
    # off the blocked kernel, a CPU without a native bf16 multiply runs bf16 linears on kernels/upcast.py's scratch
    upcast_scratch = upcast.scratch_bytes(2048, 512) if upcast.available(bf16) else 0
    with_it = accounting.activation_bytes(CFG, bf16, 512, 1024, 8, True, block)
    assert with_it - scratch == accounting.activation_bytes(CFG, bf16, 512, 1024, 8, True, 0) - upcast_scratch - \
        accounting.mlp_bytes(CFG, bf16, 512, 0) + accounting.mlp_bytes(CFG, bf16, 512, block)
    assert accounting.matmul_scratch_bytes(CFG, bf16, 512, 0) == upcast_scratch  # not the blocked kernel
    assert accounting.matmul_scratch_bytes(CFG, torch.float32, 512, block) == 0  # AMX runs bf16 only
    assert accounting.matmul_scratch_bytes(CFG, bf16, accounting.BLOCKED_LARGE_M - 1, block) == 0  # decode rows
