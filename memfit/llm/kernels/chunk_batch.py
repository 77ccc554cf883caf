"""Multi-token chunks with cached prefixes (a verify pass's gamma+1 rows per sequence, a prefill chunk after a
cached prefix) attended in one call per run of consecutive slots, instead of one call per sequence.

The PyTorch path (GPUs, and CPUs without memfit's AVX-512 kernels) over a fixed-stride cache (`kv.strided(layer)`:
(S, Lmax, Hkv, D) views). The chunks are grouped into runs of consecutive slots (kernels/slot_runs.py; on CUDA
bridged across gaps, whose pages the caller makes readable). Each run's queries are padded to the longest chunk
(Q rows per slot), K/V are the run's view `K[lo:lo+span, :length]` (no copy), and the mask is causal within the
chunk plus each sequence's own prefix: a query at position p sees positions <= p. Padding query rows and gap slots
attend to position 0 only (finite, never read back).
Sliding windows and the paged cache keep the per-sequence loop.

Token trees (engine/spec_tree_forward.py) pass an explicit mask per chunk instead of the causal one (prefix plus
the node's ancestors, window included): `plan_chunks(masks=...)` stacks them into one (span, 1, Q, L) mask per
run, once a step, and every layer reuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memfit.llm.kernels.slot_runs import SlotRun, make_gaps_readable, slot_runs


@dataclass
class ChunkRun:
    run: SlotRun  # its span: slots the view covers (gap slots included)
    q_index: torch.Tensor  # (span * Q,) rows of the step's q gathered as the run's queries (padding: any row)
    qpos: torch.Tensor  # (span, Q) each query's position in its sequence; 0 for padding rows and gap slots
    src: torch.Tensor  # (R,) the real query rows in the run's flattened (span * Q) output
    dst: torch.Tensor  # (R,) their rows in the step's output
    mask: torch.Tensor | None = None  # (span, 1, Q, L) stacked explicit masks (trees); None: causal from qpos


def plan_chunks(rows: list[int], starts: list[int], ends: list[int], slots: list[int], pad: int, max_len: int,
                device: torch.device, bridge: bool,
                masks: list[torch.Tensor] | None = None) -> tuple[list[ChunkRun], int]:
    """Chunk i: query rows rows[i] .. rows[i] + ends[i] - starts[i] - 1 of the step, cache indices starts[i] ..
    ends[i]-1, in cache slot slots[i]. `masks[i]` (optional, (ends[i] - starts[i], ends[i]) bool, on `device`)
    replaces chunk i's causal mask. Returns the runs and Q (the longest chunk)."""
    width_q = max(e - s for s, e in zip(starts, ends))
    out = []
    for run in slot_runs(slots, ends, pad, max_len, device, bridge=bridge):
        span = run.span
        pos = run.pos.tolist() if run.pos is not None else list(range(len(run.rows)))
        q_index = [rows[run.rows[0]]] * (span * width_q)
        qpos = [[0] * width_q for _ in range(span)]
        src, dst = [], []
        for i, p in zip(run.rows, pos):
            for j in range(ends[i] - starts[i]):
                q_index[p * width_q + j] = rows[i] + j
                qpos[p][j] = starts[i] + j
                src.append(p * width_q + j)
                dst.append(rows[i] + j)
        t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        mask = None if masks is None else stack_masks(masks, run, pos, width_q, ends, device)
        out.append(ChunkRun(run, t(q_index), t(qpos), t(src), t(dst), mask))
    return out, width_q


def stack_masks(masks: list[torch.Tensor], run: SlotRun, pos: list[int], width_q: int, ends: list[int],
                device: torch.device) -> torch.Tensor:
    """The run's chunks' masks in one (span, 1, Q, L) bool tensor: chunk i's at its slot's place, cut off at its
    own end (the padded keys past it are masked); padding rows and gap slots see position 0 only, as causal runs."""
    stacked = torch.zeros(run.span, width_q, run.length, dtype=torch.bool, device=device)  # (span, Q, L)
    stacked[:, :, 0] = True
    for i, p in zip(run.rows, pos):
        n = masks[i].shape[0]
        stacked[p, :n] = False
        stacked[p, :n, : ends[i]] = masks[i]
    return stacked.unsqueeze(1)


def plan_step_chunks(kv, steps: list, num_decode: int, slots: list[int], pad: int, device: torch.device,
                     bridge: bool):
    """The step's chunks with cached prefixes (start > 0) after its decode rows, planned when there are two or
    more; gap slots a bridged run reads are made readable. (step indices, runs, Q), or None."""
    rows, idx, r = [], [], num_decode
    for i in range(num_decode, len(steps)):
        if steps[i].start > 0:
            rows.append(r)
            idx.append(i)
        r += steps[i].num_new
    if len(idx) < 2:
        return None
    runs, width_q = plan_chunks(rows, [steps[i].start for i in idx], [steps[i].end for i in idx],
                                [slots[i] for i in idx], pad, kv.strided(0)[0].shape[1], device, bridge)
    make_gaps_readable(kv, [c.run for c in runs])
    return set(idx), runs, width_q


def attend_chunks(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, runs: list[ChunkRun], width_q: int,
                  scale: float, out: torch.Tensor) -> torch.Tensor:
    """q (N, Hq, D) the step's queries; k_all, v_all (S, Lmax, Hkv, D) strided views; out (N, Hq, D) written at
    the chunks' rows."""
    hq, d = q.shape[1], q.shape[2]
    for c in runs:
        r = c.run
        kc = k_all[r.lo : r.lo + r.span, : r.length].transpose(1, 2)  # (span, Hkv, L, D) view
        vc = v_all[r.lo : r.lo + r.span, : r.length].transpose(1, 2)
        qs = q.index_select(0, c.q_index).view(r.span, width_q, hq, d).transpose(1, 2)  # (span, Hq, Q, D)
        mask = c.mask
        if mask is None:  # causal: a query at position p sees positions <= p
            kpos = torch.arange(r.length, device=q.device)  # (L,)
            mask = (kpos.view(1, 1, -1) <= c.qpos.unsqueeze(2)).unsqueeze(1)  # (span, 1, Q, L)
        res = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, scale=scale, enable_gqa=hq != kc.shape[1])
        res = res.transpose(1, 2).reshape(r.span * width_q, hq, d)  # (span * Q, Hq, D)
        out.index_copy_(0, c.dst, res.index_select(0, c.src))
    return out
