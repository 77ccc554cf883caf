"""Streamed gradients (memascend, bf16/fp32): the layout never lets two live groups share bytes, the
training is bit for bit the flat buffer's (losses, SSD bytes), and the peak the kernel measures (VmHWM of a
fresh process) drops by what the model's shapes say the flat buffer held beyond the largest group."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from memfit.llm.models import ModelConfig
from memfit.train.finetune.designs import MemAscend
from memfit.train.finetune.gradients import backward_spans, last_units, streamed_layout
from memfit.train.finetune.units import make_groups, skeleton, unit_groups
from tests.train.test_finetune import cfg, make_tiny, run

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, head_dim=64)


def _groups(tied: bool):
    groups = make_groups(skeleton(ModelConfig(**SHAPE, tie_word_embeddings=tied)))
    return groups, unit_groups(groups, tied)


@pytest.mark.parametrize("tied", [False, True])
def test_layout_keeps_live_groups_apart(tied):
    groups, units = _groups(tied)
    lay = streamed_layout(groups, units)
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            (a0, a1), (b0, b1) = lay.spans[a], lay.spans[b]
            if a0 <= b1 and b0 <= a1:  # live together in the backward: disjoint bytes
                ra = range(lay.offsets[a], lay.offsets[a] + lay.numels[a])
                rb = range(lay.offsets[b], lay.offsets[b] + lay.numels[b])
                assert ra.stop <= rb.start or rb.stop <= ra.start, (groups[a].name, groups[b].name)
    aligned = lambda n: -(-n // 4096) * 4096  # noqa: E731
    if tied:  # the embedding is live from the head to the end of the backward: it plus one layer at a time
        assert lay.total == aligned(groups[0].numel) + aligned(max(g.numel for g in groups[1:-1]))
    else:  # every group is read by one unit only: one group's bytes at a time
        assert lay.total == aligned(max(g.numel for g in groups))
    # each group's gradient is complete at the last unit of the backward that reads it
    assert last_units(units, len(groups))[0] == 0 and backward_spans(units, len(groups))[-1][0] == 0


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_updates_equal_the_flat_buffer_bit_for_bit(tmp_path, monkeypatch, tied):
    """Same losses (exactly) and the same SSD reads and writes, streamed or flat; tied embeddings too (the
    embedding's gradient gathers from the head and the first unit before its update)."""
    model = make_tiny(tmp_path / "m", tied=tied)
    results = {}
    for streamed in (True, False):
        monkeypatch.setattr(MemAscend, "stream_gradients", streamed)
        r = run(cfg(model, tmp_path / str(streamed), steps=3, offload="ssd", host_memory="memascend",
                    dtype="bfloat16"))
        results[streamed] = r
        assert ("gradients (streamed)" in r.host_memory["pools"]) == streamed
    on, off = results[True], results[False]
    assert on.losses == off.losses
    assert on.losses[-1] < on.losses[0]  # it trains
    for k in ("bytes_read", "bytes_written"):
        assert on.ssd[k] == off.ssd[k]


def test_fp16_keeps_the_flat_buffer(tmp_path):
    """fp16's overflow check must see every gradient before any update: no streaming there."""
    model = make_tiny(tmp_path / "m")
    r = run(cfg(model, tmp_path, steps=1, offload="ssd", host_memory="memascend", dtype="float16"))
    assert "gradients" in r.host_memory["pools"] and "gradients (streamed)" not in r.host_memory["pools"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_schedule_sized_parameter_pool_never_stalls_the_step(tmp_path, depth):
    """The parameter pool holds only what `depth + 1` consecutive units of the fetch schedule need, while
    streamed updates run beside the prefetcher: every depth finishes (no wait on a slot that never frees),
    with the losses of depth 2."""
    model = make_tiny(tmp_path / "m", layers=3)
    out = {}

    def go(d, key):
        out[key] = run(cfg(model, tmp_path / key, steps=2, offload="ssd", host_memory="memascend",
                           dtype="bfloat16", prefetch_depth=d))

    for d, key in ((depth, "d"), (2, "ref")):
        t = threading.Thread(target=go, args=(d, key), daemon=True)
        t.start()
        t.join(240)
        assert not t.is_alive(), f"prefetch depth {d}: the step never finished (a slot wait that never ends)"
    assert out["d"].losses == out["ref"].losses


_WORKER = """
import json, sys
from memfit.llm.models import ModelConfig
from memfit.train.finetune.designs import MemAscend
from memfit.train.finetune.trainer import FinetuneConfig, run
MemAscend.stream_gradients = sys.argv[1] == "1"
cfg = FinetuneConfig(model="memfit-tiny", data=sys.argv[2], offload="ssd", ssd_dir=sys.argv[3],
                     host_memory="memascend", steps=2, batch_size=1, seq_len=64, dtype="bfloat16", seed=0,
                     model_config=ModelConfig(**json.loads(sys.argv[4])), grad_checkpointing="device")
r = run(cfg)
print(json.dumps({"peak": r.peak_rss_bytes, "baseline": r.host_memory["baseline_rss_bytes"],
                  "losses": r.losses, "ssd": [r.ssd["bytes_read"], r.ssd["bytes_written"]]}))
"""


def test_streaming_lowers_the_kernel_measured_peak(tmp_path):
    """Each run in a fresh process; VmHWM (the kernel's high-water mark, not the trainer's pools) falls by
    at least 3/4 of what the shapes say streaming saves: 4 bytes for every parameter outside the largest group."""
    from tests.train.test_finetune import write_chat_data

    data = write_chat_data(tmp_path / "chat.jsonl")
    shape = dict(SHAPE, torch_dtype="bfloat16")
    runs = {}
    for streamed in ("1", "0"):
        (tmp_path / streamed).mkdir()
        done = subprocess.run([sys.executable, "-c", _WORKER, streamed, str(data), str(tmp_path / streamed),
                               json.dumps(shape)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        assert done.returncode == 0, done.stderr[-2000:]
        runs[streamed] = json.loads(done.stdout.strip().splitlines()[-1])
    groups = make_groups(skeleton(ModelConfig(**SHAPE)))
    expected = 4 * (sum(g.numel for g in groups) - max(g.numel for g in groups))  # ~67 MB here
    on, off = runs["1"], runs["0"]
    assert on["losses"] == off["losses"] and on["ssd"] == off["ssd"]
    saved = (off["peak"] - off["baseline"]) - (on["peak"] - on["baseline"])
    assert saved >= 0.75 * expected, (saved, expected)
    assert torch.tensor(on["losses"]).isfinite().all()
