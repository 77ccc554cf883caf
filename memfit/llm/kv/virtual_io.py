"""The virtual KV cache's runner side (kv/virtual.py): a step's plan (where its new K/V rows go, which slots it
reads), the K/V writes and the context views. What places sequences in slots and commits their pages stays in
virtual.py; this mixin reads the slots and pages it set up (`self.k`/`self.v`: per layer, one strided
(max_seqs, max_seq_len, Hkv, D) view each; `_pages`, `_ranges`, `arena`, `layout`, `_lock`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memfit.llm.kv.base import KVCacheError, SeqRecord, SeqStep

WRITE_SLICES_MAX = 8  # write() copies slice by slice up to this many runs of sequences a step, else one index_put_


@dataclass
class VirtualPlan:
    seq_ids: list[int]
    slots: list[int]
    ends: list[int]
    write_slot: torch.Tensor  # (N,) slot of each new token
    write_pos: torch.Tensor  # (N,) position of each new token
    consecutive: bool  # slots == lo, lo+1, ..., lo+B-1
    max_end: int
    counts: list[int] | None = None  # new tokens of each sequence, in order (their rows are consecutive in k, v)
    # (first slot, sequences, end, new tokens each): neighbours in step order in consecutive slots with the same end
    # and count, whose rows are one (sequences, count, Hkv, D) block of k, v and one strided block of the cache
    runs: list[tuple[int, int, int, int]] | None = None


class VirtualIOMixin:
    """VirtualKVCache's runner side: the step plan, K/V writes and context views (see the module docstring)."""

    def _plan(self, steps: list[SeqStep], records: list[SeqRecord], read_len: int) -> VirtualPlan:  # type: ignore[override]
        slots = [record.slot for record in records]
        if self.prefix_caching:
            for st, slot in zip(steps, slots):
                if st.num_new:  # a step that only reads (no new rows) writes no page
                    self._check_private(slot, st.start)
        ends = [st.end for st in steps]
        dev = self.layout.device
        counts = np.array([st.num_new for st in steps])
        pos = np.concatenate([np.arange(st.start, st.end) for st in steps])
        write_slot = torch.from_numpy(np.repeat(np.array(slots), counts)).to(dev)  # (N,)
        write_pos = torch.from_numpy(pos.astype(np.int64)).to(dev)  # (N,)
        lo = slots[0]
        consecutive = slots == list(range(lo, lo + len(slots)))
        if dev.type == "cuda":  # padded reads past a short sequence's pages must hit mapped memory
            npg = self.pages_for(read_len)
            self.arena.make_readable([r for s in slots for r in self._ranges(s, self._pages[s], npg) if r[1] > 0])
        runs: list[list[int]] | None = None
        if dev.type == "cpu" and counts.min() > 1:  # only write()'s slice path reads them: decode steps skip this
            runs = []
            for slot, end, n in zip(slots, ends, counts.tolist()):
                last = runs[-1] if runs else None
                if last is not None and last[0] + last[1] == slot and last[2] == end and last[3] == n:
                    last[1] += 1
                else:
                    runs.append([slot, 1, end, n])
        return VirtualPlan([st.seq_id for st in steps], slots, ends, write_slot, write_pos, consecutive, read_len,
                           counts.tolist(), None if runs is None else [tuple(r) for r in runs])

    def make_slots_readable(self, slots: list[tuple[int, int]]) -> None:
        """Make the first `n` positions of each (slot, n) safe to read, whoever holds the slot: a decode batch
        that bridges empty slots reads them (kernels/slot_runs.py). Nothing to do on the CPU (zero page)."""
        if self.layout.device.type != "cuda":
            return
        with self._lock:
            ranges = [r for s, n in slots for r in self._ranges(s, self._pages[s], self.pages_for(n)) if r[1] > 0]
            self.arena.make_readable(ranges)

    def write(self, layer: int, plan: VirtualPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dtype != self.layout.dtype or v.dtype != self.layout.dtype:
            raise KVCacheError(f"K/V dtype {k.dtype} does not match the cache's {self.layout.dtype}")
        if len(plan.slots) == 1:  # one sequence: a plain slice copy
            s, e = plan.slots[0], plan.ends[0]
            n = k.shape[0]
            self.k[layer][s, e - n : e].copy_(k)
            self.v[layer][s, e - n : e].copy_(v)
            return
        if (plan.counts is not None and plan.runs is not None and len(plan.runs) <= WRITE_SLICES_MAX
                and min(plan.counts) > 1 and self.layout.device.type == "cpu"):
            # A few prefill chunks on the CPU: one slice copy a run of sequences (a batch of equal prompts in
            # consecutive slots is one run). A layer's K and V of the 0.1b shape, one thread
            # (benchmarks/kv_write.py, one run each): 4 x 128 rows 22 us against index_put_'s 95, 16 x 128 rows
            # 139 against 410 (a copy a sequence, before the runs: 41 at 4 x 128, and 245 at 16 x 128 in a probe not
            # kept). Single-row (decode) sequences and CUDA keep one index_put_ (8 x 1 rows: 6 us; a copy a row would
            # cost more, and a kernel launch each on a GPU). The plan carries runs only where this path may take them.
            if k.shape[0] != sum(plan.counts) or v.shape[0] != k.shape[0]:  # index_put_ refuses these too
                raise KVCacheError(f"K/V have {k.shape[0]}/{v.shape[0]} rows for a step of {sum(plan.counts)}")
            row = 0
            for s, r, e, n in plan.runs:  # k, v rows [row, row + r n) -> slots [s, s + r), positions [e - n, e)
                self.k[layer][s : s + r, e - n : e].copy_(k[row : row + r * n].unflatten(0, (r, n)))
                self.v[layer][s : s + r, e - n : e].copy_(v[row : row + r * n].unflatten(0, (r, n)))
                row += r * n
            return
        idx = (plan.write_slot, plan.write_pos)
        self.k[layer].index_put_(idx, k)  # touches only rows (slot, pos) of the step
        self.v[layer].index_put_(idx, v)

    def context(self, layer: int, plan: VirtualPlan, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = plan.slots[i], plan.ends[i]
        return self.k[layer][s, :e], self.v[layer][s, :e]  # views, (end, Hkv, D)

    def strided(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def context_batch(self, layer: int, plan: VirtualPlan) -> tuple[torch.Tensor, torch.Tensor]:
        lmax = plan.max_end
        if plan.consecutive:
            lo, hi = plan.slots[0], plan.slots[0] + len(plan.slots)
            return self.k[layer][lo:hi, :lmax], self.v[layer][lo:hi, :lmax]  # views, (B, Lmax, Hkv, D)
        # Slots out of order: copy the B rows (each K[l][s, :Lmax] is contiguous, so this is B memcpys and
        # reads only those slots' memory).
        return (torch.stack([self.k[layer][s, :lmax] for s in plan.slots]),
                torch.stack([self.v[layer][s, :lmax] for s in plan.slots]))
