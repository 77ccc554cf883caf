"""Blockwise gradients (memascend, untied): the embedding's and the head's float32 gradients made a block of
vocabulary rows at a time as AdamW reads them, never whole. Same bits as the dense accumulators (the pieces,
the losses, the saved weights and moments), and the peak the kernel measures (VmHWM of a fresh process) falls
by what the buffer no longer holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memfit.llm.models import ModelConfig
from memfit.train.finetune.data import IGNORE
from memfit.train.finetune.designs import MemAscend
from memfit.train.finetune.gradients import (DenseGrad, PieceGrad, RowBlocks, blockwise_groups, embedding_rows,
                                             streamed_layout)
from memfit.train.finetune.units import (HEAD_GRAD_ROWS, Batch, HeadRows, UnitRunner, embedding_grad_rows,
                                         make_groups, skeleton, unit_groups)
from tests.train.test_finetune import cfg, make_tiny, run, write_chat_data

ROOT = Path(__file__).resolve().parents[2]


def _pieces(source: PieceGrad, total: int, piece: int) -> torch.Tensor:
    out = torch.full((total,), float("nan"))  # every element must be written
    for s in range(0, total, piece):
        source.fill(s, min(piece, total - s), out[s : s + piece])
    return out


def test_head_pieces_equal_the_dense_accumulator_bit_for_bit():
    """The head group [norm (C), lm_head (V, C)] read in pieces that cut rows and blocks anywhere equals the
    dense path's float32 buffer: chunks of 7 tokens (one chunk without a target), V no multiple of the block."""
    width = 96
    mc = ModelConfig(vocab_size=2 * HEAD_GRAD_ROWS + 1808, hidden_size=width, intermediate_size=128,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=24)
    model = skeleton(mc)
    runner = UnitRunner(model, loss_chunk=7)
    gen = torch.Generator().manual_seed(0)
    weights = {"model.norm.weight": torch.ones(width, dtype=torch.bfloat16),
               "lm_head.weight": (torch.randn(mc.vocab_size, width, generator=gen) * 0.05).bfloat16()}
    ids = torch.randint(0, mc.vocab_size, (1, 30), generator=gen)
    labels = ids.clone()
    labels[0, 7:14] = IGNORE
    batch = Batch.make(ids, labels, model, torch.device("cpu"))
    x0, r0 = (torch.randn(30, width, generator=gen).bfloat16() for _ in range(2))
    leaves = [(x0.clone().requires_grad_(True), r0.clone().requires_grad_(True)) for _ in range(2)]
    dense = torch.zeros(mc.vocab_size, width)
    want_loss = runner.head_step(weights, leaves[0], batch, 8.0, dense)
    rows = HeadRows(mc.vocab_size, width)
    got_loss = runner.head_step(weights, leaves[1], batch, 8.0, rows)
    assert torch.equal(got_loss, want_loss)
    assert torch.equal(leaves[0][0].grad, leaves[1][0].grad) and torch.equal(leaves[0][1].grad, leaves[1][1].grad)
    norm = torch.randn(width, generator=gen).bfloat16()
    source = PieceGrad([(0, width, DenseGrad(norm)),
                        (width, dense.numel(), RowBlocks(mc.vocab_size, width, HEAD_GRAD_ROWS, rows.rows))])
    want = torch.cat([torch.zeros(width).add_(norm), dense.reshape(-1)])
    for piece in (4096 * 50, 4096 * 7, want.numel()):
        source.parts[1][2]._at = -1  # each pass reads the group from its start again
        assert torch.equal(_pieces(source, want.numel(), piece), want), piece
    with pytest.raises(ValueError):
        rows.rows(1, HEAD_GRAD_ROWS)  # not a block of head_step's: other products, other bits


def test_embedding_pieces_equal_index_add_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    vocab, width = 3 * HEAD_GRAD_ROWS + 77, 24
    ids = torch.cat([torch.randint(0, 30, (300,), generator=gen), torch.randint(0, vocab, (300,), generator=gen)])
    grad = torch.randn(ids.numel(), width, generator=gen).bfloat16()
    tokens, rows = embedding_grad_rows(ids, grad)
    want = torch.zeros(vocab, width)
    want.index_add_(0, tokens, rows.float())
    source = PieceGrad([(0, vocab * width, RowBlocks(vocab, width, HEAD_GRAD_ROWS, embedding_rows(tokens, rows, width)))])
    assert torch.equal(_pieces(source, vocab * width, 4096 * 3), want.reshape(-1))


def test_layout_takes_one_piece_for_blockwise_groups():
    shape = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, head_dim=64)
    groups = make_groups(skeleton(ModelConfig(**shape)))
    units = unit_groups(groups, False)
    piece = MemAscend().optimizer_piece(groups)
    assert blockwise_groups(groups, False, 256, 2) == {0, len(groups) - 1}
    assert blockwise_groups(groups, False, 2048, 2) == {0}  # 2048 x 32000 x 2 bytes > 32000 x 768 x 4
    assert blockwise_groups(groups, True, 256, 2) == {0}  # tied: the embedding, its head rows kept to unit 0
    assert blockwise_groups(groups, True, 2048, 2) == frozenset()
    lay = streamed_layout(groups, units, blockwise_groups(groups, False, 256, 2), piece)
    layer = max(g.numel for g in groups[1:-1])
    assert lay.total == -(-layer // 4096) * 4096 < groups[0].numel  # 27 MiB instead of 94 at 0.1B


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


@pytest.mark.parametrize("offload,seq_len,tied", [("ssd", 48, False), ("ssd", 96, False), ("host", 48, False),
                                                   ("ssd", 48, True), ("host", 48, True), ("ssd", 96, True)])
def test_blockwise_training_equals_the_buffer_bit_for_bit(tmp_path, monkeypatch, offload, seq_len, tied):
    """Losses, SSD bytes, and the saved weights and Adam moments after 3 steps: identical with and without
    blockwise gradients (seq 48: embedding and head; 96: the embedding only, 2 x 96 tokens of logits' gradients
    being larger than the head's); token chunks of 7, so the head keeps several. Tied: the embedding's blocks
    are the head's rows plus the batch's token rows (seq 48), or dense (96)."""
    model = make_tiny(tmp_path / "m", tied=tied)
    res = {}
    for on in (True, False):
        monkeypatch.setattr(MemAscend, "blockwise_gradients", on)
        res[on] = run(cfg(model, tmp_path / str(on), steps=3, offload=offload, host_memory="memascend",
                          dtype="bfloat16", seq_len=seq_len, loss_chunk_tokens=7, save=str(tmp_path / f"ck{on}")))
    assert res[True].losses == res[False].losses and res[True].losses[-1] < res[True].losses[0]
    assert res[True].ssd.get("bytes_read") == res[False].ssd.get("bytes_read")
    assert res[True].ssd.get("bytes_written") == res[False].ssd.get("bytes_written")
    a, b = _tensors(tmp_path / "ckTrue"), _tensors(tmp_path / "ckFalse")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    pool = "gradients (streamed)"
    smaller = res[True].host_memory["pools"][pool] < res[False].host_memory["pools"][pool]
    assert smaller == (seq_len == 48)  # at 96 the dense head (as large as the embedding) still sizes it
    if tied and seq_len == 48:  # the buffer no longer holds the tied embedding's (V, C) float32 gradient
        groups = make_groups(skeleton(ModelConfig.from_dir(model)))
        saved = res[False].host_memory["pools"][pool] - res[True].host_memory["pools"][pool]
        assert saved >= 4 * (groups[0].numel - MemAscend().optimizer_piece(groups)), saved


_WORKER = """
import json, sys
from memfit.llm.models import ModelConfig
from memfit.train.finetune.designs import MemAscend
from memfit.train.finetune.trainer import FinetuneConfig, run
setattr(MemAscend, sys.argv[5], sys.argv[1] == "1")  # the design flag under test, on or off
cfg = FinetuneConfig(model="memfit-tiny", data=sys.argv[2], offload="ssd", ssd_dir=sys.argv[3],
                     host_memory="memascend", steps=2, batch_size=1, seq_len=64, dtype="bfloat16", seed=0,
                     model_config=ModelConfig(**json.loads(sys.argv[4])), grad_checkpointing="device",
                     mmap_threshold=1 << 20)  # as the CLI: freed temporaries go back, so the peak is the step's
r = run(cfg)
print(json.dumps({"peak": r.peak_rss_bytes, "baseline": r.host_memory["baseline_rss_bytes"],
                  "losses": r.losses, "pools": r.host_memory["pools"]}))
"""


# a 2-layer model whose (32768, 512) embedding and untied head are the largest groups
FRESH_SHAPE = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=8, head_dim=64, torch_dtype="bfloat16")


def fresh_runs(tmp_path: Path, flag: str) -> dict[str, dict]:
    """2 steps of FRESH_SHAPE (memascend, SSD) in a fresh process each with MemAscend.<flag> on ("1") and off
    ("0"): peak (VmHWM), baseline, losses and pools of each."""
    data = write_chat_data(tmp_path / "chat.jsonl")
    runs = {}
    for on in ("1", "0"):
        (tmp_path / on).mkdir()
        done = subprocess.run([sys.executable, "-c", _WORKER, on, str(data), str(tmp_path / on),
                               json.dumps(FRESH_SHAPE), flag],
                              capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        assert done.returncode == 0, done.stderr[-2000:]
        runs[on] = json.loads(done.stdout.strip().splitlines()[-1])
    return runs


def fresh_groups():
    return make_groups(skeleton(ModelConfig(**{k: v for k, v in FRESH_SHAPE.items() if k != "torch_dtype"})))


def test_blockwise_lowers_the_kernel_measured_peak(tmp_path):
    """Fresh processes, VmHWM (the kernel's high-water mark): the peak falls by at least 3/4 of the bytes the
    streamed buffer no longer holds: 4 per element of the embedding (the largest group) beyond the largest
    layer."""
    runs = fresh_runs(tmp_path, "blockwise_gradients")
    groups = fresh_groups()
    expected = 4 * (groups[0].numel - max(g.numel for g in groups[1:-1]))  # ~57 MB
    on, off = runs["1"], runs["0"]
    assert on["losses"] == off["losses"]
    saved = (off["peak"] - off["baseline"]) - (on["peak"] - on["baseline"])
    assert saved >= 0.75 * expected, (saved, expected, on["pools"], off["pools"])
