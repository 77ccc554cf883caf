"""The host swap tier: where a preempted sequence's KV waits, so that it resumes without recomputation.

    swap = SwapSpace(kv, MemoryBudget(8 << 30, Tier.HOST, name="swap_space", parent=ledger))
    swap.try_swap_out(seq_id, n)   # before the scheduler frees the sequence's KV: copy positions 0..n-1 out
    kv.try_allocate(seq_id, n + k); swap.swap_in(seq_id)   # later, into whatever memory it gets then

The scheduler calls these (it never touches a tensor itself); this module and the KV manager own the copies.
A swapped sequence's KV is one host buffer (uint8, pinned on CUDA), reserved in the swap budget before it is
allocated: a full tier refuses (`try_swap_out` returns False) and the scheduler recomputes the sequence instead.

How many copies a swap takes is the cache's layout (`runs`), and is the point of FastSwitch's block groups:
- virtual cache: a sequence's K/V are contiguous per segment of its slot, so the first n rows of each segment
  are one run: 1 copy for the token-major layout, 2 x layers for per-layer, 2 x layers x heads for head-major;
- paged cache: every block of every layer's K and V is its own run (2 x layers x blocks copies): vLLM's
  per-block synchronous swap, kept as the baseline.
`block_tokens` splits the virtual cache's runs into copies of that many tokens: the per-block baseline in the
same cache, so a comparison differs in the copy granularity alone (benchmarks/preemption.py).
Swap-outs are synchronous: the scheduler preempts because it needs the memory in the same step. Swap-ins may
run on a thread pool (`threads` > 0), overlapped with the model step: `start_swap_in` launches the copies into
the memory the sequence was just given, the scheduler admits the sequence only once `swap_in_ready`, and
`finish_swap_in` completes it on the engine thread. The copies are torch copies, which release the GIL. The
scheduler falls back to a synchronous swap-in when there is no step to overlap with.

`prefers_swap` is the `auto` preemption mode's cost model: the seconds to move the bytes out and back in
(per-copy overhead + bytes / measured copy bandwidth) against the seconds to recompute n tokens (linear
layers 2 x params flops per token, attention 2 x layers x q-width x n^2 in all, at the compute rate the
engine measures from its prefill steps).
"""
from __future__ import annotations

import bisect
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from memfit.llm.kv.base import KVCacheError, KVCacheManager
from memfit.memory.budget import MemoryBudget

OWNER = "swap"
# Seconds of one swap-out or swap-in (all its copies): a histogram's bucket bounds (`le`), for /metrics.
SWAP_SECONDS_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class SwapStats:
    out_bytes: int = 0
    in_bytes: int = 0
    out_ops: int = 0  # copies (runs), not sequences
    in_ops: int = 0
    # Histogram of seconds per swap-out or swap-in: counts per SWAP_SECONDS_BUCKETS bound (+Inf last), and the sum.
    seconds_counts: list[int] = field(default_factory=lambda: [0] * (len(SWAP_SECONDS_BUCKETS) + 1))
    seconds_sum: float = 0.0
    resident_bytes: int = 0


@dataclass
class _Swapped:
    buf: torch.Tensor  # (nbytes,) uint8 on the host
    num_tokens: int


@dataclass
class CostModel:
    """Modelled seconds of the two ways back from a preemption (see the module docstring)."""

    params: int  # the model's parameter count
    layers: int
    q_width: int  # num_attention_heads x head_dim
    flops_per_s: float = 2e10  # until the engine measures a prefill step
    bytes_per_s: float = 5e9  # until a copy is measured
    op_s: float = 2e-6  # per copy call
    _alpha: float = 0.3  # EMA weight of a new measurement

    def recompute_s(self, n: int) -> float:
        return (2 * self.params * n + 2 * self.layers * self.q_width * n * n) / self.flops_per_s

    def swap_s(self, nbytes: int, ops: int) -> float:
        return 2 * (ops * self.op_s + nbytes / self.bytes_per_s)  # out, then back in

    def observe_compute(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.flops_per_s += self._alpha * (2 * self.params * tokens / seconds - self.flops_per_s)

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.bytes_per_s += self._alpha * (nbytes / seconds - self.bytes_per_s)


class SwapSpace:
    def __init__(self, kv: KVCacheManager, budget: MemoryBudget, cost: CostModel | None = None,
                 threads: int = 0, block_tokens: int | None = None) -> None:
        if not (kv.fixed_stride or kv.block_tables):
            raise ValueError(f"the {kv.kind or type(kv).__name__} KV cache cannot be swapped (it declares neither "
                             "fixed_stride nor block_tables)")
        if threads < 0:
            raise ValueError(f"swap threads must be >= 0, got {threads}")
        if block_tokens is not None and block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.kv, self.budget, self.cost, self.threads = kv, budget, cost, threads
        self.block_tokens = block_tokens  # None: whole runs (see the module docstring)
        self.pin = kv.layout.device.type == "cuda"
        self.stats = SwapStats()
        self.async_swap_ins = 0  # swap-ins that ran on the pool (the rest were synchronous)
        self._held: dict[int, _Swapped] = {}
        self._inflight: dict[int, tuple[_Swapped, int, Future]] = {}  # seq -> (entry, copies, future of seconds)
        self._pool: ThreadPoolExecutor | None = None

    # ---- where a sequence's KV lives, as contiguous runs ---------------------------------------------
    def runs(self, seq_id: int, num_tokens: int) -> list[torch.Tensor]:
        """The memory holding positions 0..num_tokens-1 of `seq_id`, as the fewest contiguous uint8 runs the
        layout allows, in an order that depends only on num_tokens (so a swap-in into other memory matches)."""
        kv = self.kv
        if kv.fixed_stride:  # virtual cache: the first n rows of each segment of the slot
            slot, nbytes = kv.slot_of(seq_id), num_tokens * kv.row_bytes  # type: ignore[attr-defined]
            base = slot * kv.slot_bytes  # type: ignore[attr-defined]
            step = nbytes if self.block_tokens is None else self.block_tokens * kv.row_bytes  # type: ignore[attr-defined]
            return [kv.arena.view(torch.uint8, (min(step, nbytes - lo),), (1,), base + j * kv.seg_bytes + lo)  # type: ignore[attr-defined]
                    for j in range(kv.num_segments) for lo in range(0, nbytes, step)]  # type: ignore[attr-defined]
        blocks = kv.block_table(seq_id)[: kv.blocks_for(num_tokens)]  # type: ignore[attr-defined]
        out = []
        for pool in (*kv.k, *kv.v):  # type: ignore[attr-defined]
            for b in blocks:
                block = pool[b]  # (bs, Hkv, D); head-major storage is (Hkv, bs, D): one contiguous run either way
                block = block.transpose(0, 1) if kv.head_major else block  # type: ignore[attr-defined]
                out.append(block.reshape(-1).view(torch.uint8))
        return out

    # ---- the scheduler's calls ----------------------------------------------------------------------
    def holds(self, seq_id: int) -> bool:
        return seq_id in self._held

    def prefers_swap(self, num_tokens: int) -> bool:
        if self.cost is None:
            return True
        runs = self.runs_shape(num_tokens)
        return self.cost.swap_s(*runs) < self.cost.recompute_s(num_tokens)

    def runs_shape(self, num_tokens: int) -> tuple[int, int]:
        """(bytes, copies) a swap of `num_tokens` tokens moves each way."""
        kv = self.kv
        if kv.fixed_stride:
            per_seg = 1 if self.block_tokens is None else -(-num_tokens // self.block_tokens)
            return num_tokens * kv.row_bytes * kv.num_segments, kv.num_segments * per_seg  # type: ignore[attr-defined]
        nb = kv.blocks_for(num_tokens)  # type: ignore[attr-defined]
        return nb * kv.block_bytes, 2 * kv.layout.num_layers * nb  # type: ignore[attr-defined]

    def try_swap_out(self, seq_id: int, num_tokens: int) -> bool:
        """Copy positions 0..num_tokens-1 of `seq_id` to the host tier; False (nothing taken) if it is full.
        The caller frees the sequence's KV afterwards."""
        if seq_id in self._held:
            raise KVCacheError(f"sequence {seq_id} is already swapped out")
        t0 = time.perf_counter()
        runs = self.runs(seq_id, num_tokens)
        nbytes = sum(r.numel() for r in runs)
        if not self.budget.try_reserve(nbytes, OWNER):
            return False
        try:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            off = 0
            for r in runs:
                buf[off : off + r.numel()].copy_(r)
                off += r.numel()
        except BaseException:
            self.budget.release(nbytes, OWNER)
            raise
        self._held[seq_id] = _Swapped(buf, num_tokens)
        self._account(nbytes, len(runs), time.perf_counter() - t0, out=True)
        return True

    def swap_in(self, seq_id: int) -> int:
        """Copy `seq_id`'s KV back into the memory the KV manager now gives it (the caller allocated at least
        the swapped tokens), mark them written, and free the host copy. Returns the tokens restored."""
        entry = self._held.pop(seq_id)
        runs = self.runs(seq_id, entry.num_tokens)
        seconds = _copy_in(runs, entry.buf)
        return self._complete(seq_id, entry, len(runs), seconds)

    def start_swap_in(self, seq_id: int) -> None:
        """`swap_in` on the thread pool: the copies overlap the next model step (which must not touch this
        sequence's KV: it is not scheduled until `finish_swap_in`)."""
        if not self.threads:
            raise RuntimeError("asynchronous swap-in needs threads > 0")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="memfit-swap")
        entry = self._held.pop(seq_id)
        runs = self.runs(seq_id, entry.num_tokens)  # resolved here, on the engine thread, under the cache's lock
        self._inflight[seq_id] = (entry, len(runs), self._pool.submit(_copy_in, runs, entry.buf))

    def in_flight(self, seq_id: int) -> bool:
        return seq_id in self._inflight

    def swap_in_ready(self, seq_id: int) -> bool:
        return self._inflight[seq_id][2].done()

    def finish_swap_in(self, seq_id: int) -> int:
        """Wait for an asynchronous swap-in (at once if `swap_in_ready`) and complete it on this thread."""
        entry, copies, future = self._inflight.pop(seq_id)
        self.async_swap_ins += 1
        return self._complete(seq_id, entry, copies, future.result())

    def _complete(self, seq_id: int, entry: _Swapped, copies: int, seconds: float) -> int:
        self.kv.mark_restored(seq_id, entry.num_tokens)  # a restored sequence holds these tokens again
        self._account(entry.buf.numel(), copies, seconds, out=False)
        self._drop(entry)
        return entry.num_tokens

    def discard(self, seq_id: int) -> None:
        """The sequence finished or was aborted while swapped out: forget its host copy."""
        entry = self._held.pop(seq_id, None)
        if entry is not None:
            self._drop(entry)
        if seq_id in self._inflight:  # the copies write into its KV: let them land before that is freed
            entry, _, future = self._inflight.pop(seq_id)
            future.exception()
            self._drop(entry)

    def _drop(self, entry: _Swapped) -> None:
        n = entry.buf.numel()
        self.budget.release(n, OWNER)
        self.stats.resident_bytes -= n

    def _account(self, nbytes: int, ops: int, seconds: float, out: bool) -> None:
        st = self.stats
        if out:
            st.out_bytes, st.out_ops, st.resident_bytes = st.out_bytes + nbytes, st.out_ops + ops, st.resident_bytes + nbytes
        else:
            st.in_bytes, st.in_ops = st.in_bytes + nbytes, st.in_ops + ops
        st.seconds_counts[bisect.bisect_left(SWAP_SECONDS_BUCKETS, seconds)] += 1
        st.seconds_sum += seconds
        if self.cost is not None:
            self.cost.observe_copy(nbytes, seconds)

    def close(self) -> None:
        for seq_id in [*self._held, *self._inflight]:
            self.discard(seq_id)
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _copy_in(runs: list[torch.Tensor], buf: torch.Tensor) -> float:
    """Copy `buf` (the host copy) back into `runs`, in order; returns the seconds it took."""
    t0 = time.perf_counter()
    off = 0
    for r in runs:
        r.copy_(buf[off : off + r.numel()])
        off += r.numel()
    if off != buf.numel():
        raise KVCacheError(f"swap-in layout differs from swap-out ({off} vs {buf.numel()} bytes)")
    return time.perf_counter() - t0
