"""The meta-device skeleton: the engine's modules with every parameter's shape, at no resident cost (the
process's RSS, read by the kernel, in a fresh interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import torch
from memfit.llm.models import ModelConfig
from memfit.memory.measure import status_bytes
from memfit.train.finetune.units import make_groups, skeleton
before = status_bytes()["RssAnon"]
model = skeleton(ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, head_dim=64))
print(json.dumps({"grown": status_bytes()["RssAnon"] - before, "dynamo": "torch._dynamo" in sys.modules,
                  "meta": all(p.is_meta for p in model.parameters()),
                  "numel": sum(g.numel for g in make_groups(model))}))
"""


def test_skeleton_costs_no_resident_memory():
    """Built on the meta device with torch.nn.init skipped: torch's meta `normal_` would import torch._dynamo
    (about 150 MiB of RSS, measured 78 MiB of it anonymous) for nothing to fill."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["meta"] and out["numel"] == 134_105_856  # every parameter, shaped, none stored
    assert not out["dynamo"]
    assert out["grown"] < 16 << 20, out


def _head_reference(runner, weights, x, residual, batch, scale):
    """The head through plain autograd over the whole (V, C) output matrix, per chunk as units.py cuts them."""
    import torch.nn.functional as F

    from memfit.train.finetune.data import IGNORE

    cfg = runner.cfg
    h = runner.model.model.norm.ops.add_rms_norm(x, residual, weights["model.norm.weight"], cfg.rms_norm_eps)[1]
    w = weights[runner.head_weight].detach().requires_grad_(True)
    hd, labels = h.detach(), batch.labels.reshape(-1)
    grad_h, acc = torch.zeros_like(hd), torch.zeros(w.shape, dtype=torch.float32)
    total = torch.zeros(())
    for s in range(0, hd.shape[0], runner.loss_chunk):
        t = labels[s : s + runner.loss_chunk]
        if not bool((t != IGNORE).any()):
            continue
        hc = hd[s : s + runner.loss_chunk].requires_grad_(True)
        loss = F.cross_entropy(F.linear(hc, w).float(), t, ignore_index=IGNORE, reduction="sum")
        gh, gw = torch.autograd.grad(loss * scale / batch.n_targets, (hc, w))
        grad_h[s : s + runner.loss_chunk] = gh
        acc.add_(gw)
        total += loss.detach()
    return total / batch.n_targets, grad_h, acc


def test_head_gradient_in_vocabulary_blocks_equals_autograd_bit_for_bit():
    """The head's output-matrix gradient made HEAD_GRAD_ROWS vocabulary rows at a time (never the whole (V, C)
    bf16 matrix) equals plain autograd's, bit for bit: loss, input gradient and the float32 accumulator; a
    vocabulary that is no multiple of the block, chunks of 7 tokens (one without a target), bf16."""
    from memfit.llm.models import ModelConfig
    from memfit.train.finetune.data import IGNORE
    from memfit.train.finetune.units import HEAD_GRAD_ROWS, Batch, UnitRunner, skeleton

    cfg = ModelConfig(vocab_size=2 * HEAD_GRAD_ROWS + 1808, hidden_size=96, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=24)
    model = skeleton(cfg)
    runner = UnitRunner(model, loss_chunk=7)
    gen = torch.Generator().manual_seed(0)
    weights = {"model.norm.weight": torch.ones(96, dtype=torch.bfloat16),
               "lm_head.weight": (torch.randn(cfg.vocab_size, 96, generator=gen) * 0.05).bfloat16()}
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=gen)
    labels = ids.clone()
    labels[0, 7:14] = IGNORE  # the second chunk has no target: skipped
    batch = Batch.make(ids, labels, model, torch.device("cpu"))
    x0, r0 = (torch.randn(30, 96, generator=gen).bfloat16() for _ in range(2))

    def leaves():
        return x0.clone().requires_grad_(True), r0.clone().requires_grad_(True)

    x, r = leaves()
    got_acc = torch.zeros(cfg.vocab_size, 96)
    got = runner.head_step(weights, (x, r), batch, 8.0, got_acc)
    xr, rr = leaves()
    want, want_grad_h, want_acc = _head_reference(runner, weights, xr, rr, batch, 8.0)
    assert torch.equal(got, want) and torch.equal(got_acc, want_acc)
    # the input gradient, through the final norm, lands in the leaves' .grad either way
    xr2, rr2 = leaves()
    h = runner.model.model.norm.ops.add_rms_norm(xr2, rr2, weights["model.norm.weight"], cfg.rms_norm_eps)[1]
    h.backward(want_grad_h)
    assert torch.equal(x.grad, xr2.grad) and torch.equal(r.grad, rr2.grad)


def test_embedding_gradient_rows_equal_autograd_bit_for_bit():
    """The embedding's gradient on the batch's rows only equals the rows of autograd's dense (V, C) gradient,
    bit for bit, in each dtype (bf16 and fp16 round every add, so the order of the adds matters): tokens
    repeated up to 60 times and in any order; every other row of autograd's is zero."""
    import torch.nn.functional as F

    from memfit.train.finetune.units import embedding_grad_rows

    gen = torch.Generator().manual_seed(0)
    vocab, width = 500, 48
    ids = torch.cat([torch.randint(0, 20, (600,), generator=gen), torch.randint(0, vocab, (200,), generator=gen)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        grad = torch.randn(ids.numel(), width, generator=gen).to(dtype)
        w = torch.zeros(vocab, width, dtype=dtype, requires_grad=True)
        F.embedding(ids, w).backward(grad)
        tokens, rows = embedding_grad_rows(ids, grad)
        assert rows.dtype == dtype and torch.equal(tokens, torch.unique(ids))
        assert torch.equal(rows, w.grad[tokens]), dtype
        rest = torch.ones(vocab, dtype=torch.bool)
        rest[tokens] = False
        assert not w.grad[rest].any()
