"""kernels/backends.py: which MLPs run long steps in row blocks, and that blocking changes no bit of the model."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.engine import accounting
from memfit.llm.kernels.backends import BackendOptions, mlp_row_blocks, prepare_model
from memfit.llm.kernels.blocked import LARGE_M
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
        assert [m.row_block for m in mlps] == [LARGE_M] * len(mlps)
        x = torch.randn(5 * LARGE_M + 17, 64, dtype=dtype)  # (N, C): blocks of 64, 64, 64, 64 and the last 81
        whole = mlps[0]._rows(x)  # the MLP over all rows in one call
        rows = _gate_up_rows(model)
        blocked = mlps[0](x)
        assert torch.equal(blocked, whole)
        assert rows == [LARGE_M] * 4 + [LARGE_M + 17]  # no gate/up intermediate larger than a block
        rows.clear()
        mlps[0](x[: 2 * LARGE_M - 1])
        assert rows == [2 * LARGE_M - 1]  # below two blocks: one call
        rows.clear()
        got = model.dense_logits(ids)  # the whole model: every layer's MLP in blocks
        assert rows == [LARGE_M, LARGE_M, LARGE_M + 8] * len(mlps)  # 200 rows: 64, 64 and the last 72
        for m in mlps:
            m.row_block = 0
        assert torch.equal(got, model.dense_logits(ids))


def test_only_the_blocked_kernel_blocks():
    model = tiny(tie=False, dtype=torch.float32)
    assert mlp_row_blocks(model) == 0  # nn.Linear (oneDNN / MKL: a row's sums may depend on the call's rows)
    assert all(layer.mlp.row_block == 0 for layer in model.model.layers)
    assert accounting.mlp_row_block("cpu", "blocked") == LARGE_M == accounting.BLOCKED_LARGE_M
    assert accounting.mlp_row_block("cpu", "onednn") == accounting.mlp_row_block("cuda", None) == 0


def test_the_mlp_term_counts_one_block():
    """activation_bytes' MLP term: the intermediates of at most 2 x block - 1 rows, against the whole chunk."""
    cfg = tiny(tie=False, dtype=torch.float32).config
    whole = accounting.activation_bytes(cfg, torch.float32, 448, 448, 1, True)
    blocked = accounting.activation_bytes(cfg, torch.float32, 448, 448, 1, True, LARGE_M)
    assert whole - blocked == 3 * (448 - (2 * LARGE_M - 1)) * cfg.intermediate_size * 4
    small = accounting.activation_bytes(cfg, torch.float32, 100, 448, 1, True, LARGE_M)
    assert small == accounting.activation_bytes(cfg, torch.float32, 100, 448, 1, True)  # under two blocks: whole
