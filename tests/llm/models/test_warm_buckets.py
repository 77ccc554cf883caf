"""Every oneDNN kernel a CPU model's linears will build is built at load (packing.warm_row_buckets), the head's only
up to the rows it takes, and the ledger counts them (fallback_accounting.kernel_counts): checked against the heap
in use (the allocator's own count) in fresh processes, for memfit's row-major kernel (its rows past 64) and plain
F.linear."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memfit.llm.engine import fallback_accounting
from memfit.llm.models.config import ModelConfig
from memfit.llm.models.packing import ROW_BUCKETS, onednn_buckets

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "memfit" / "assets" / "models" / "memfit-tiny"

# argv: how ("memfit" | "plain"), max_rows, head_rows, and the rows the sweep then gives the head
_RUN = r"""
import gc, json, sys
import torch
from memfit.llm.engine import fallback_accounting
from memfit.llm.models.loader import load_model
from memfit.llm.models.packing import row_bucket_plain_linears, warm_row_buckets
from memfit.memory.measure import heap_in_use_bytes
torch.set_num_threads(1)
how, max_rows, head_rows, head_sweep = sys.argv[1], *map(int, sys.argv[2:5])
model, cfg = load_model(sys.argv[5], dtype=torch.bfloat16)  # the bundled checkpoint, bf16: mapped, its head tied
if how == "memfit":
    from memfit.llm.kernels.linear import use_row_major_linears
    assert use_row_major_linears(model) > 0
else:
    assert row_bucket_plain_linears(model) > 0
mods = {}
for m in model.modules():  # one module a shape (the kernels are per shape)
    if hasattr(m, "in_features") and m is not model.lm_head:
        mods.setdefault((m.out_features, m.in_features, m.bias is None), m)

def held():
    gc.collect()
    return heap_in_use_bytes()

def sweep(mod, rows):
    with torch.inference_mode():
        for r in range(1, rows + 1):
            mod(torch.randn(r, mod.in_features, dtype=torch.bfloat16))

for m in list(mods.values()) + [model.lm_head]:
    sweep(m, 1)  # a first call each: what the first call of a kernel library sets up is not a shape's kernel
h0 = held()
calls = warm_row_buckets(model, max_rows, head_rows)
h1 = held()
for m in mods.values():
    sweep(m, max_rows)
sweep(model.lm_head, head_rows)
h2 = held()
sweep(model.lm_head, head_sweep)  # past the head's rows: kernels the warm-up left out
h3 = held()
print(json.dumps({"warm": h1 - h0, "sweep": h2 - h1, "past_head": h3 - h2, "calls": calls,
                  "term": fallback_accounting.shape_cache_bytes(cfg, None if how == "plain" else how, max_rows,
                                                                head_rows=head_rows)}))
"""


def _run(how: str, max_rows: int, head_rows: int, head_sweep: int) -> dict:
    from memfit.llm.models.packing import can_pack_for_cpu

    if not can_pack_for_cpu(torch.bfloat16):
        pytest.skip("this torch build/CPU runs no bf16 oneDNN linear")
    if how == "memfit":
        from memfit.llm.kernels.linear import can_use_row_major

        if not can_use_row_major(torch.bfloat16):
            pytest.skip("memfit's row-major kernel does not run here")
    out = subprocess.run([sys.executable, "-c", _RUN, how, str(max_rows), str(head_rows), str(head_sweep), str(TINY)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_buckets_past_the_row_major_kernels_rows():
    assert onednn_buckets(64, 64) == () and onednn_buckets(40, 0) == (1, 2, 4, 8, 16, 24, 32, 48)
    assert onednn_buckets(100, 64) == (96, 128) and onednn_buckets(256, 64) == (96, 128, 192, 256)
    assert onednn_buckets(257, 64) == ROW_BUCKETS  # a block of 256 and a tail of any size
    assert onednn_buckets(10**9) == ROW_BUCKETS


def test_counts_follow_each_matrix_and_the_heads_own_rows():
    cfg = ModelConfig.from_dir(TINY)  # tied head, bf16 on disk
    head = ("plain", cfg.vocab_size, cfg.hidden_size, False)
    plain = fallback_accounting.kernel_counts(cfg, None, 512, head_rows=8)
    assert plain[head] == 4 and set(plain.values()) == {4, len(ROW_BUCKETS)}  # 1, 2, 4, 8: the head; all else 13
    row_major = fallback_accounting.kernel_counts(cfg, "memfit", 512, head_rows=40)
    assert head not in row_major and set(row_major.values()) == {len(ROW_BUCKETS)}
    assert fallback_accounting.kernel_counts(cfg, "memfit", 100, head_rows=100)[head] == 2  # 96, 128
    # blocked: a tied head is packed where the checkpoint is mapped; row-major (and counted) where it is not
    assert fallback_accounting.kernel_counts(cfg, "blocked", 512, head_rows=300) == {}
    assert fallback_accounting.kernel_counts(cfg, "blocked", 512, head_rows=104, mapped=False) == {head: 2}
    assert fallback_accounting.kernel_counts(cfg, "upcast", 512) == {}
    # onednn: packed and fused; unfused where the engine does not fuse; a tied head not mapped stays plain F.linear
    packed = fallback_accounting.kernel_counts(cfg, "onednn", 512, head_rows=8)
    unfused = fallback_accounting.kernel_counts(cfg, "onednn", 512, head_rows=8, fused=False)
    kv = ("packed", cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size, False)  # k_proj (and v_proj) alone
    assert {k[0] for k in packed} == {"packed"} and kv not in packed and kv in unfused
    assert fallback_accounting.kernel_counts(cfg, "onednn", 512, head_rows=8, mapped=False)[head] == 4
    # the head's rows: sampled, verified (a chain of g, a W,D tree) and a draft's (one a sequence, W a tree level)
    assert fallback_accounting.head_rows(8) == 8 and fallback_accounting.head_rows(8, 4) == 40
    assert fallback_accounting.head_rows(8, 3, (4, 3)) == 104
    assert fallback_accounting.head_rows(8, 4, draft=True) == 8
    assert fallback_accounting.head_rows(8, 3, (4, 3), draft=True) == 32


def test_a_draft_counts_only_what_its_target_lacks():
    cfg = ModelConfig.from_dir(TINY)
    target = fallback_accounting.kernel_counts(cfg, None, 512, head_rows=40)
    assert fallback_accounting.shape_cache_bytes(cfg, None, 512, besides=target, head_rows=8, measure=False) == 0
    more = fallback_accounting.shape_cache_bytes(cfg, None, 512, besides=target, head_rows=104, measure=False)
    one = fallback_accounting.shape_cache_bytes(cfg, None, 1, measure=False) // len(target)  # one kernel
    assert more == 3 * one  # the head's buckets 64, 96 and 128, past the target's 48


@pytest.mark.slow
@pytest.mark.parametrize("how,max_rows,head_rows", [("memfit", 300, 8), ("plain", 130, 8)])
def test_warm_up_builds_what_the_ledger_counts_and_no_more(how, max_rows, head_rows):
    """After the warm-up, calls at every row count up to the step's rows (and the head's) build nothing new; the
    warm-up's own growth is within the ledger's term and at least half of it (each kernel is sized by a like
    measurement, engine/onednn_kernels.py: what this checks is the count). The head called past its rows builds the
    kernels the cap left out, so the cap (and this measure) is real."""
    r = _run(how, max_rows, head_rows, 256)
    mib = 2**20
    assert r["term"] > 0 and r["calls"] > 0
    assert r["term"] / 2 <= r["warm"] <= r["term"] + mib, (r, r["warm"] / mib, r["term"] / mib)
    assert r["sweep"] <= mib, r
    skipped = len(onednn_buckets(256, 64 if how == "memfit" else 0)) - len(
        onednn_buckets(head_rows, 64 if how == "memfit" else 0))
    assert r["past_head"] >= skipped * r["term"] / sum(
        fallback_accounting.kernel_counts(ModelConfig.from_dir(TINY), None if how == "plain" else how, max_rows,
                                          head_rows=head_rows).values()) / 2, r
