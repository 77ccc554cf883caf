"""What a swap tier counts (`SwapStats`, one per tier, for /metrics) and what the `auto` preemption mode weighs
(`CostModel`): the seconds to move a sequence's KV out and back in against the seconds to recompute it."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from memfit.llm.kv.base import KVCacheError

OWNER = "swap"  # the owner name swapped KV is reserved under, in every tier's budget


class SwapLost(KVCacheError):
    """A swapped-out sequence's KV cannot be brought back intact (an I/O error, a checksum mismatch): the
    sequence must be recomputed."""

# Seconds of one swap-out or swap-in (all its copies): a histogram's bucket bounds (`le`), for /metrics.
SWAP_SECONDS_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class SwapStats:
    out_bytes: int = 0
    in_bytes: int = 0
    out_ops: int = 0  # copies (runs) or writes, not sequences
    in_ops: int = 0
    # Histogram of seconds per swap-out or swap-in: counts per SWAP_SECONDS_BUCKETS bound (+Inf last), and the sum.
    seconds_counts: list[int] = field(default_factory=lambda: [0] * (len(SWAP_SECONDS_BUCKETS) + 1))
    seconds_sum: float = 0.0
    resident_bytes: int = 0
    kept_evictions: int = 0  # kept copies (cross-turn reuse) dropped or demoted under pressure
    reused_tokens: int = 0  # swap-out tokens not moved because a valid copy was already held
    io_errors: int = 0  # failed writes or reads, checksum mismatches (SSD tier): each one recomputed
    swap_ins: int = 0  # sequences restored (in_ops counts their copies)
    merges: int = 0  # swap-outs that merged a copy's host chunks into one buffer (swap_pairs.py)

    def account(self, nbytes: int, ops: int, seconds: float, out: bool) -> None:
        if out:
            self.out_bytes, self.out_ops = self.out_bytes + nbytes, self.out_ops + ops
        else:
            self.in_bytes, self.in_ops = self.in_bytes + nbytes, self.in_ops + ops
        self.seconds_counts[bisect.bisect_left(SWAP_SECONDS_BUCKETS, seconds)] += 1
        self.seconds_sum += seconds


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

