"""bf16 decode attention on AMX tiles (attend_amx.h): as accurate as the AVX-512 path against float64, one
arithmetic for every cache layout (per-layer and head-major slots, paged blocks shorter and longer than a 16-row
tile, windows), and the AVX-512 path wherever the shape does not fit a tile (G > 16, D = 256) or AMX is hidden."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memfit.llm.kernels import build
from memfit.llm.kernels.decode import decode_amx_on, set_by_seq_min_bytes, set_decode_amx
from tests.llm.kernels.test_cpu_decode import ops_for, reference_attention
from tests.llm.kernels.test_cpu_paged import paged_layout

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def amx_ops():
    ops = ops_for(torch.bfloat16)
    old = set_decode_amx(True)  # the tiles everywhere ("auto", the default, takes them where a sequence's rows are runs)
    if not decode_amx_on():
        pytest.skip("no AMX-BF16 here (or hidden by MEMFIT_CPU_ISA, or Linux refused the tile state)")
    yield ops
    set_decode_amx(old)


def _case(hq, hkv, d, lens, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int64)
    k = torch.randn(len(lens), int(lens.max()), hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(len(lens), int(lens.max()), hkv, d, generator=g).to(torch.bfloat16)
    q = torch.randn(len(lens), hq, d, generator=g).to(torch.bfloat16)
    return q, k, v, lens, g


def _all_layouts(ops, q, k, v, lens, scale, window, g):
    """The output read from per-layer slots (head by head, and every head of a sequence in one pass), head-major
    slots and paged pools of 4, 16 and 32-token blocks."""
    slots = torch.arange(len(lens), dtype=torch.int64)
    old = set_by_seq_min_bytes(2**62)
    try:
        outs = {"per-layer": ops.decode_attention(q, k, v, slots, lens, scale, window)}
        set_by_seq_min_bytes(0)  # sequences of 256 tokens or more: attend_heads(_amx)
        outs["per-layer, by sequence"] = ops.decode_attention(q, k, v, slots, lens, scale, window)
    finally:
        set_by_seq_min_bytes(old)
    kh, vh = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    outs["head-major"] = ops.decode_attention(q, kh, vh, slots, lens, scale, window)
    for bs in (4, 16, 32):
        kp, vp, table = paged_layout([k[i, :n] for i, n in enumerate(lens)], [v[i, :n] for i, n in enumerate(lens)],
                                     bs, g)
        kp, vp = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kp, vp))
        outs[f"paged {bs}"] = ops.paged_attention(q, kp, vp, table, lens, scale, window)
    return outs


# GQA 1, 3, 4, 7 (Qwen2-0.5B), 16 (a tile's columns); D 32-128; lengths below, at and around 16 and 32 and long;
# (32, 2, 64) and (256, 16, 32): G 16 read a sequence at a time, and 16 KV heads of 16 (attend_heads_amx's largest H)
@pytest.mark.parametrize("hq,hkv,d", [(8, 8, 64), (6, 2, 32), (32, 8, 64), (14, 2, 64), (16, 1, 128), (12, 4, 96),
                                      (8, 2, 128), (32, 2, 64), (256, 16, 32)])
@pytest.mark.parametrize("window", [None, 21, 290])  # 290: a window long enough to be read a sequence at a time
def test_amx_decode_matches_float64_like_avx512_and_is_one_arithmetic_for_every_layout(amx_ops, hq, hkv, d, window):
    q, k, v, lens, g = _case(hq, hkv, d, [1, 15, 16, 17, 31, 33, 300, 700], seed=hq * 100 + d)
    scale = 1 / math.sqrt(d)
    ref = reference_attention(q, k, v, torch.arange(len(lens)), lens, scale, window)
    errs = {}
    for amx in (False, True):
        set_decode_amx(amx)
        outs = _all_layouts(amx_ops, q, k, v, lens, scale, window, g)
        first = outs["per-layer"]
        for name, out in outs.items():
            assert torch.equal(out, first), name  # every reader: the same bits
        errs[amx] = (first.double() - ref).abs()
        if amx:
            amx_out = first
        else:
            avx_out = first
    # P rounded to bf16 on the tiles: at most 2^-9 of each weight, as the output's own rounding is of each output
    assert errs[True].max() < 1e-2, errs[True].max()
    assert errs[True].mean() < 2 * errs[False].mean() + 1e-4, (errs[True].mean(), errs[False].mean())
    assert not torch.equal(amx_out, avx_out)  # the tile path ran (its sums round in another order)


def test_shapes_off_the_tiles_stay_on_avx512(amx_ops):
    """G > 16 (more query heads than a tile has columns) and D = 256: the AVX-512 path's bits, AMX on or off."""
    for hq, hkv, d in ((34, 2, 64), (4, 2, 256)):
        q, k, v, lens, g = _case(hq, hkv, d, [40, 70], seed=5)
        outs = {}
        for amx in (False, True):
            set_decode_amx(amx)
            outs[amx] = amx_ops.decode_attention(q, k, v, torch.arange(2), lens, 0.1)
        assert torch.equal(outs[True], outs[False]), (hq, hkv, d)


def test_float32_never_takes_the_tiles(amx_ops):
    ops = ops_for(torch.float32)
    q, k, v, lens, g = _case(8, 2, 64, [50, 90], seed=7)
    q, k, v = q.float(), k.float(), v.float()
    outs = {}
    for amx in (False, True):
        set_decode_amx(amx)
        outs[amx] = ops.decode_attention(q, k, v, torch.arange(2), lens, 0.125)
    assert torch.equal(outs[True], outs[False])


def _fresh_process(env: dict[str, str], ask: bool, ask_first: bool | None = None) -> subprocess.CompletedProcess:
    """A child that prints decode_amx_mode() after the kernels' first bf16 use, and after asking for the tiles
    (`ask`); with `ask_first`, set_decode_amx(ask_first) is called before any kernel is used."""
    first = "" if ask_first is None else f"set_decode_amx({ask_first})\n"
    code = ("import torch\nfrom memfit.llm.kernels.decode import CpuDecodeOps, decode_amx_mode, set_decode_amx\n"
            f"{first}CpuDecodeOps(torch.bfloat16)\nprint(decode_amx_mode())\n{'set_decode_amx(True)' if ask else ''}\n"
            "print(decode_amx_mode())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MEMFIT_CPU_ISA", "MEMFIT_DECODE_AMX")} | env
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})


def _amx_state_in_a_fresh_process(env: dict[str, str], ask: bool, ask_first: bool | None = None) -> str:
    out = _fresh_process(env, ask, ask_first)
    assert out.returncode == 0, out.stderr[-2000:]
    return " ".join(out.stdout.split())


def test_the_tiles_default_to_auto_and_never_where_amx_is_hidden():
    """"auto" by default where AMX runs, everywhere with MEMFIT_DECODE_AMX=1, nowhere with 0; MEMFIT_CPU_ISA=avx512
    hides AMX: the decode kernels stay on AVX-512 even when asked for the tiles. A value it does not know is refused
    with its name, not read as off."""
    ops_for(torch.bfloat16)
    assert _amx_state_in_a_fresh_process({"MEMFIT_CPU_ISA": "avx512", "MEMFIT_DECODE_AMX": "1"}, ask=True) == \
        "False False"
    assert _amx_state_in_a_fresh_process({"MEMFIT_DECODE_AMX": "0"}, ask=False) == "False False"
    bad = _fresh_process({"MEMFIT_DECODE_AMX": "yes"}, ask=False)
    assert bad.returncode != 0 and "MEMFIT_DECODE_AMX='yes'" in bad.stderr, bad.stderr[-2000:]
    if "amx_bf16" in build.cpu_flags():
        assert _amx_state_in_a_fresh_process({}, ask=False) == "auto auto"
        assert _amx_state_in_a_fresh_process({}, ask=True) == "auto True"
        assert _amx_state_in_a_fresh_process({"MEMFIT_DECODE_AMX": "1"}, ask=False) == "True True"
        # an explicit call before the kernels' first use wins over the environment's default, either way
        assert _amx_state_in_a_fresh_process({}, ask=False, ask_first=True) == "True True"
        assert _amx_state_in_a_fresh_process({"MEMFIT_DECODE_AMX": "1"}, ask=False, ask_first=False) == "False False"
    else:
        assert _amx_state_in_a_fresh_process({}, ask=False) == "False False"


def test_auto_takes_the_tiles_where_a_sequences_rows_lie_in_runs(amx_ops):
    """Mode "auto" at fewer than 4 query heads a KV head: paged blocks, head-major slots and per-layer rows of up to
    512 bytes read a sequence at a time (from 256 tokens) run on the tiles (the AMX bits); a per-layer slot read head
    by head (a short context, or by choice), rows further apart (a token-major slot's: a token's row holds every
    layer's) and wider per-layer rows (8 KV heads of 64: 1 KiB) on AVX-512 (the AVX-512 bits); the two paths' bits
    differ here."""
    q, k, v, lens, g = _case(12, 4, 64, [17, 300], seed=11)
    wide_k = torch.zeros(*k.shape[:2], 3, *k.shape[2:], dtype=k.dtype)  # (S, L, 3, Hkv, D): rows 3 x Hkv x D apart
    wide_v = torch.zeros_like(wide_k)
    wide_k[:, :, 1], wide_v[:, :, 1] = k, v
    wk, wv = wide_k[:, :, 1], wide_v[:, :, 1]
    slots = torch.arange(len(lens), dtype=torch.int64)
    outs, wide = {}, {}
    for mode in (False, True, "auto"):
        set_decode_amx(mode)
        outs[mode] = _all_layouts(amx_ops, q, k, v, lens, 0.125, None, torch.Generator().manual_seed(1))
        wide[mode] = amx_ops.decode_attention(q, wk, wv, slots, lens, 0.125)
    for name in ("per-layer", "per-layer, by sequence"):
        assert not torch.equal(outs[True][name][0], outs[False][name][0])
        assert not torch.equal(outs[True][name][1], outs[False][name][1])
    by_seq = outs["auto"].pop("per-layer, by sequence")  # 300 tokens a sequence at a time, 17 head by head
    assert torch.equal(by_seq[1], outs[True]["per-layer, by sequence"][1])
    assert torch.equal(by_seq[0], outs[False]["per-layer, by sequence"][0])
    assert torch.equal(outs["auto"].pop("per-layer"), outs[False]["per-layer"])  # head by head
    for name, out in outs["auto"].items():
        assert torch.equal(out, outs[True][name]), name
    assert torch.equal(wide[True], outs[True]["per-layer"]) and not torch.equal(wide[True], wide[False])
    assert torch.equal(wide["auto"], wide[False])
    q, k, v, lens, g = _case(16, 8, 64, [17, 300], seed=12)  # 1 KiB per-layer rows: AVX-512; head-major: the tiles
    for mode in (False, True, "auto"):
        set_decode_amx(mode)
        outs[mode] = _all_layouts(amx_ops, q, k, v, lens, 0.125, None, torch.Generator().manual_seed(1))
    assert not torch.equal(outs[True]["per-layer, by sequence"], outs[False]["per-layer, by sequence"])
    for name, out in outs["auto"].items():
        assert torch.equal(out, outs[not name.startswith("per-layer")][name]), name


# G 4 (1 KiB rows), G 7 (D 128: 1 KiB), G 4 at D 96 (768 B) and at D 32 (512 B); a window long enough to be read a
# sequence at a time
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 64), (28, 4, 128), (16, 4, 96), (32, 8, 32)])
@pytest.mark.parametrize("window", [None, 290])
def test_auto_takes_the_tiles_for_per_layer_rows_at_four_or_more_query_heads_a_kv_head(amx_ops, hq, hkv, d, window):
    """At G >= 4 "auto" reads per-layer rows of any width on the tiles, a sequence at a time and head by head, so
    every layout gives the tiles' bits; rows further apart (a token-major slot's) stay on AVX-512."""
    q, k, v, lens, g = _case(hq, hkv, d, [17, 300], seed=13)
    wide_k = torch.zeros(*k.shape[:2], 3, *k.shape[2:], dtype=k.dtype)  # (S, L, 3, Hkv, D): rows 3 x Hkv x D apart
    wide_v = torch.zeros_like(wide_k)
    wide_k[:, :, 1], wide_v[:, :, 1] = k, v
    slots = torch.arange(len(lens), dtype=torch.int64)
    outs, wide = {}, {}
    for mode in (False, True, "auto"):
        set_decode_amx(mode)
        outs[mode] = _all_layouts(amx_ops, q, k, v, lens, 0.125, window, torch.Generator().manual_seed(1))
        wide[mode] = amx_ops.decode_attention(q, wide_k[:, :, 1], wide_v[:, :, 1], slots, lens, 0.125, window)
    for name in ("per-layer", "per-layer, by sequence"):
        assert not torch.equal(outs[True][name], outs[False][name])  # the two paths differ here
    for name, out in outs["auto"].items():
        assert torch.equal(out, outs[True][name]), name
    assert not torch.equal(wide[True], wide[False]) and torch.equal(wide["auto"], wide[False])


GUARDED = r'''
import ctypes, math, mmap, sys, torch
from memfit.llm.kernels.decode import CpuDecodeOps, decode_amx_on, set_by_seq_min_bytes, set_decode_amx
from tests.llm.kernels.test_cpu_decode import reference_attention
ops = CpuDecodeOps(torch.bfloat16)
set_decode_amx(True)
assert decode_amx_on()
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []
def guarded(shape):
    """A bf16 tensor whose last byte sits right before a PROT_NONE page: a read past it faults."""
    n = math.prod(shape) * 2
    page = mmap.PAGESIZE
    size = -(-n // page) * page
    m = mmap.mmap(-1, size + page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base + size, page, 0) == 0
    t = torch.frombuffer(m, dtype=torch.bfloat16, count=n // 2, offset=size - n).view(shape)
    keep.append(m)
    return t
g = torch.Generator().manual_seed(0)
hq, hkv, d = 12, 4, 64
for L in (1, 15, 16, 17, 31, 33, 300):
    for head_major in (False, True):
        for min_bytes in (0, 2**62):  # per-layer: every head in one pass, and head by head
            shape = (1, hkv, L, d) if head_major else (1, L, hkv, d)
            k, v = guarded(shape), guarded(shape)
            k.copy_(torch.randn(shape, generator=g)); v.copy_(torch.randn(shape, generator=g))
            if head_major:
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            q = torch.randn(1, hq, d, generator=g).to(torch.bfloat16)
            lens = torch.tensor([L])
            set_by_seq_min_bytes(min_bytes)
            out = ops.decode_attention(q, k, v, torch.tensor([0]), lens, d ** -0.5)
            ref = reference_attention(q, k, v, torch.tensor([0]), lens, d ** -0.5)
            assert (out.double() - ref).abs().max().item() < 2e-2, (L, head_major)
print("ok")
'''


def test_no_read_past_a_sequences_last_row(amx_ops):
    """Tile loads fault where prefetches do not: a slot whose last row ends right before an unmapped page (a
    PROT_NONE guard) is read on the tiles without touching it, in every per-layer path and head-major; lengths
    around the 16-row tiles and 32-token steps. In a child process, so a fault fails this test, not the run."""
    out = subprocess.run([sys.executable, "-c", GUARDED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("kv_layout", ["paged", "head-major", "per-layer"])
def test_engine_in_the_default_mode_gives_the_torch_tokens(amx_ops, tmp_path, kv_layout):
    """The engine's default mode ("auto") reads a bf16 model's paged blocks, head-major and per-layer slots on the
    tiles (the routing test above): its greedy tokens, through the whole-step stack and op by op, are the PyTorch
    path's."""
    from memfit.llm.engine.llm_engine import LLMEngine
    from tests.llm.kernels.test_cpu_decode import _greedy
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama", dtype="bfloat16", hidden_size=128)  # D 32, G 2
    prompts = [list(range(3, 23)), list(range(40, 45)), list(range(7, 40))]  # 20, 5, 33 tokens: partial blocks
    cache = {"kv_cache": "paged", "block_size": 4} if kv_layout == "paged" else {"kv_layout": kv_layout}
    opts = {"model": str(path), "device": "cpu", "kv_budget": "8MiB", "max_num_seqs": 3, **cache}
    ref = _greedy(LLMEngine(**opts, cpu_kernels=False, cpu_linear="onednn"), prompts)
    set_decode_amx("auto")
    stack = LLMEngine(**opts, cpu_linear="blocked")
    assert stack.runner.stack is not None
    assert _greedy(stack, prompts) == ref
    op_by_op = LLMEngine(**opts, cpu_linear="onednn")
    assert op_by_op.runner.stack is None and op_by_op.backends.cpu_kernels
    assert _greedy(op_by_op, prompts) == ref
