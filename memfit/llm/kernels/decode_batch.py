"""Batched one-token (decode) attention on the PyTorch path: GPUs, CPUs without memfit's kernels, and the paged
cache's gathered batches.

`decode_attention` attends B single query rows over padded caches (B, L, Hkv, D), with a reusable `Workspace` for
the head-major K/V copies its CPU low-precision path makes; `attend_slot_runs` runs it over the runs of
consecutive slots of a fixed-stride cache (kernels/slot_runs.py), so a batch with gaps or out of slot order is
read in place instead of gathered. `attention.CachedAttention` chooses between them each step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memfit.llm.kernels.slot_runs import SlotRun


# Below this many K elements, one decode token's bf16/fp16 attention on a CPU is faster in float32: oneDNN's
# reduced-precision batched matmuls pay a fixed ~30 us each, more than widening a short K/V costs (measured
# by benchmarks/decode_ops.py, one thread: 1 x 64 tokens x 4 heads x 64: 91 us in bf16, 32 us via float32;
# 113 vs 74 us at 256 tokens, which is where the threshold falls for this shape).
SMALL_ATTENTION_ELEMS = 1 << 16


def small_cpu_lowp(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype != torch.float32 and k.numel() <= SMALL_ATTENTION_ELEMS


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor | None, scale: float,
                     workspace: Workspace | None = None) -> torch.Tensor:
    """Batched single-token attention over padded caches.

    q: (B, Hq, D); k, v: (B, L, Hkv, D) (often a strided view straight into the cache); lens: (B,) valid
    lengths, or None when every row uses all L positions -> (B, Hq, D). `workspace` (optional) holds the
    head-major K/V copies the CPU low-precision path makes, so they reuse memory instead of faulting in
    fresh pages every layer.
    """
    b, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    if small_cpu_lowp(q, k):
        return decode_attention(q.float(), k.float(), v.float(), lens, scale).to(q.dtype)
    if q.dtype != torch.float32 and q.device.type == "cpu":
        # PyTorch's CPU SDPA kernel is several times slower in bf16/fp16 than two batched matmuls for a
        # single query row (measured here: 8 x 64 tokens, 12 heads: 660 us vs 180 us), so do it by hand,
        # with the softmax in float32. Query heads are grouped under their KV head (GQA) so K/V are
        # read once per KV head, not once per query head.
        qg = q.view(b, hkv, hq // hkv, d)  # (B, Hkv, G, D)
        # The cache view's batch dims (slot, head) can't fold into one bmm batch stride, so matmul copies
        # K anyway: copy it head-major (B, Hkv, L, D) (rows stay contiguous: 8-11x cheaper than the
        # (B, Hkv, D, L) transpose-copy matmul makes of a permuted view) and hand bmm the transposed view.
        ws = workspace or Workspace()
        kh = ws.take(0, (b, hkv, length, d), k.dtype).copy_(k.transpose(1, 2))  # (B, Hkv, L, D)
        vh = ws.take(1, (b, hkv, length, d), v.dtype).copy_(v.transpose(1, 2))
        scores = torch.matmul(qg, kh.transpose(2, 3)).float() * scale  # (B, Hkv, G, L)
        if lens is not None:
            pad = torch.arange(length, device=k.device) >= lens.view(b, 1, 1, 1)  # (B, 1, 1, L)
            scores.masked_fill_(pad, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, vh).reshape(b, hq, d)  # (B, Hkv, G, D) -> (B, Hq, D)
    qh = q.unsqueeze(2)  # (B, Hq, 1, D)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, L, D)
    mask = None
    if lens is not None:
        mask = (torch.arange(length, device=k.device) < lens.unsqueeze(1)).view(b, 1, 1, -1)  # (B,1,1,L)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
    return out.squeeze(2)


def bridges_gaps(device: torch.device) -> bool:
    """Whether decode runs are joined across empty slots: on a GPU, where every run is a launch of its own
    (kernels/slot_runs.py); on a CPU a run costs little and a gap's reads would be wasted."""
    return device.type == "cuda"


def attend_slot_runs(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, runs: list[SlotRun], scale: float,
                     out: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """q (B, Hq, D) over k_all, v_all (S, Lmax, Hkv, D) strided views, run by run -> out (B, Hq, D)."""
    for run in runs:
        n = run.span
        kc, vc = k_all[run.lo : run.lo + n, : run.length], v_all[run.lo : run.lo + n, : run.length]  # views
        if run.pos is not None:  # a span bridging gaps: query rows at their slots' positions, the gaps' rows zero
            qs = q.new_zeros((n, *q.shape[1:]))  # (span, Hq, D)
            qs.index_copy_(0, run.pos, q.index_select(0, run.index))
            res = decode_attention(qs, kc, vc, run.lens, scale, workspace)
            out.index_copy_(0, run.index, res.index_select(0, run.pos))
        elif run.index is None:
            r0 = run.rows[0]
            out[r0 : r0 + n] = decode_attention(q[r0 : r0 + n], kc, vc, run.lens, scale, workspace)
        else:
            res = decode_attention(q.index_select(0, run.index), kc, vc, run.lens, scale, workspace)
            out.index_copy_(0, run.index, res)
    return out


class Workspace:
    """Scratch buffers that outlive one attention call (the runner keeps one per engine).

    A large fresh tensor on a CPU costs a page fault per 4 KiB on first touch (~5 ms for the 16 MB K copy of
    8 x 4096 tokens, more than the copy itself); reusing the memory removes that. Each slot keeps the largest
    buffer asked of it, so the workspace holds at most two layers' worth of one step's K and V.
    """

    def __init__(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._bufs.values())
