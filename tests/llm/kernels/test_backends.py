"""kernels/backends.py: which MLPs run long steps in row blocks, and that blocking changes no bit of the model."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.engine import accounting
from memfit.llm.kernels.backends import BackendOptions, mlp_row_blocks, prepare_model
from memfit.llm.kernels.blocked import LARGE_M, mlp_row_block
from tests.llm.kernels.common import need
from tests.llm.models.test_packing import tiny


def _gate_up_rows(model) -> list[int]:
    """Rows of every gate/up projection call from now on (a forward hook per MLP)."""
    rows: list[int] = []
    for layer in model.model.layers:
        layer.mlp.gate_up_proj.register_forward_hook(lambda m, inp, out: rows.append(out.shape[0]))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_mlps_run_long_steps_in_blocks_with_the_same_bits(dtype):
    need(dtype)
    model = tiny(tie=False, dtype=dtype)
    ids = torch.randint(0, 96, (4, 50))  # 200 rows in one step (the tiny model has 64 positions)
    with torch.inference_mode():
        chosen = prepare_model(model, BackendOptions(max_num_seqs=8, cpu_linear="blocked"), torch.device("cpu"))
        assert chosen.cpu_linear == "blocked"
        mlps = [layer.mlp for layer in model.model.layers]
        b = mlp_row_block(dtype)  # LARGE_M, or a larger block for bf16 where prefill runs on AMX tiles
        assert [m.row_block for m in mlps] == [b] * len(mlps) and b >= LARGE_M
        assert accounting.mlp_row_block("cpu", "blocked", dtype) == b  # the ledger counts the same block
        x = torch.randn(5 * b + 17, 64, dtype=dtype)  # (N, C): blocks of b, b, b, b and the last b + 17
        whole = mlps[0]._rows(x)  # the MLP over all rows in one call
        rows = _gate_up_rows(model)
        blocked = mlps[0](x)
        assert torch.equal(blocked, whole)
        assert rows == [b] * 4 + [b + 17]  # no gate/up intermediate larger than a block
        rows.clear()
        mlps[0](x[: 2 * b - 1])
        assert rows == [2 * b - 1]  # below two blocks: one call
        rows.clear()
        got = model.dense_logits(ids)  # the whole model: every layer's MLP in blocks
        want = [b] * (200 // b - 1) + [200 - b * (200 // b - 1)] if 200 >= 2 * b else [200]
        assert rows == want * len(mlps)  # 200 rows at b = 64: 64, 64 and the last 72
        for m in mlps:
            m.row_block = 0
        assert torch.equal(got, model.dense_logits(ids))


def test_only_the_blocked_kernel_blocks():
    model = tiny(tie=False, dtype=torch.float32)
    assert mlp_row_blocks(model) == 0  # nn.Linear (oneDNN / MKL: a row's sums may depend on the call's rows)
    assert all(layer.mlp.row_block == 0 for layer in model.model.layers)
    assert accounting.mlp_row_block("cpu", "blocked", torch.float32) == LARGE_M == accounting.BLOCKED_LARGE_M
    assert accounting.mlp_row_block("cpu", "onednn", torch.float32) == 0  # AMX runs bf16 only: fp32 keeps LARGE_M
    assert accounting.mlp_row_block("cuda", None, torch.bfloat16) == 0


def _peak_allocated_bytes(fn) -> int:
    """Peak bytes torch's CPU allocator holds above the start while fn runs (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for ev in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns()):
        live += ev.nbytes()  # + allocation, - free
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("rows", [100, 3 * LARGE_M - 1, 5 * LARGE_M + 17])
def test_the_mlp_term_is_what_the_allocator_holds(rows):
    """accounting.mlp_bytes against the allocator: the peak an MLP call holds is its (rows, hidden) output plus
    the term, blocked (from 2 x LARGE_M rows: one block's intermediates and its down-projection output) or not."""
    need(torch.float32)  # the blocked linears under test run only where memfit's AVX-512 kernels do
    model = tiny(tie=False, dtype=torch.float32)
    with torch.inference_mode():
        prepare_model(model, BackendOptions(max_num_seqs=8, cpu_linear="blocked"), torch.device("cpu"))
        mlp = model.model.layers[0].mlp
        x = torch.randn(rows, model.config.hidden_size)
        mlp(x)  # warm: packing buffers and first-call caches are not the step's
        peak = _peak_allocated_bytes(lambda: mlp(x))
    out = rows * model.config.hidden_size * 4
    counted = out + accounting.mlp_bytes(model.config, torch.float32, rows, mlp.row_block)
    if rows % LARGE_M == LARGE_M - 1 or rows < 2 * LARGE_M:  # whole, or the last block at its largest (2b - 1)
        assert peak == counted
    else:  # a shorter last block (b + rows % b rows): the term bounds it
        last = LARGE_M + rows % LARGE_M
        i, h = model.config.intermediate_size, model.config.hidden_size
        assert out + 3 * last * i * 4 + last * h * 4 == peak < counted


def test_a_bf16_model_without_native_bf16_runs_upcast():
    from memfit.llm.kernels import upcast
    from memfit.llm.kernels.backends import choose_cpu_linear

    if not upcast.available(torch.bfloat16):
        pytest.skip("the CPU has a native bf16 multiply: memfit's AVX-512 kernels or oneDNN run bf16")
    from memfit.llm.models.packing import can_pack_for_cpu

    if can_pack_for_cpu(torch.bfloat16):
        pytest.skip("oneDNN packs bf16 here (AVX-512 without bf16): it is chosen first")
    cpu = torch.device("cpu")
    assert choose_cpu_linear(BackendOptions(), cpu, torch.bfloat16) == "upcast"
    assert choose_cpu_linear(BackendOptions(cpu_linear="upcast"), cpu, torch.bfloat16) == "upcast"
    assert choose_cpu_linear(BackendOptions(), cpu, torch.float32) != "upcast"
    model = tiny(tie=True, dtype=torch.bfloat16)
    few, many = torch.randint(0, 96, (1, 5)), torch.randint(0, 96, (2, 40))  # 5 rows: AVX2 kernel; 80: MKL blocks
    with torch.inference_mode():
        want = [model.dense_logits(ids).float() for ids in (few, many)]
        chosen = prepare_model(model, BackendOptions(cpu_kernels=False), cpu)
        got = [model.dense_logits(ids).float() for ids in (few, many)]
    assert chosen.cpu_linear == "upcast" and chosen.num_upcast_linears == 2 * 7 + 1 and chosen.num_fused_layers == 0
    assert isinstance(model.lm_head, upcast.Bf16UpcastLinear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied, no copy
    for g, w in zip(got, want):  # aten's bf16 and float32-from-bf16 round differently: the packing test's bound
        assert (g - w).abs().max().item() <= 0.1 * max(1.0, w.abs().max().item() / 10)
