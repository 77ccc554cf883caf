"""`preallocated` KV cache: every slot's K/V committed for the model's whole length when the cache is built, as
the reference speculative-decoding loops (Medusa, EAGLE) allocate their KV (`--kv-cache preallocated`).

It is the virtual cache (kv/virtual.py: the same strided views, so the same kernels read it) with its pages
committed up front instead of on demand: `max_seqs` slots x 2 x layers segments x `max_seq_len` rows, reserved
in the budget (owner "kv") and populated at construction, so the ledger and the process's RSS hold the whole
maximum-length KV before the first request. Nothing is ever decommitted: a finished sequence leaves its slot
full for the next, and `reclaim` gives nothing back. There is no prefix caching (a preallocated slot is private
to its sequence), so a conversation's next turn re-prefills its history unless a session keeps the sequence.

It exists as the baseline of benchmarks/speculative_mtbench_four.py (the "unbounded" decoder) and for users who
want the reference design's memory profile: a fixed footprint, no page faults while decoding. A budget that
cannot hold every slot at full length is refused when the cache is built, with the figure.
"""
from __future__ import annotations

from memfit.llm.kv.base import KVLayout
from memfit.llm.kv.registry import register_kv_cache
from memfit.llm.kv.virtual import VirtualKVCache, _Seq
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, format_bytes


@register_kv_cache("preallocated")
class PreallocatedKVCache(VirtualKVCache):
    preallocates = True  # every slot is committed at full length from construction on

    @classmethod
    def engine_options(cls, *, max_num_seqs: int, block_size: int, kv_layout: str = "auto", **_: object) -> dict:
        # Only the slot count and the page layout apply (any other option is ignored): nothing is committed later,
        # so there is nothing to prefault or commit eagerly, and slots are private (no prefix caching).
        opts = super().engine_options(max_num_seqs=max_num_seqs, block_size=block_size, kv_layout=kv_layout)
        return {"max_seqs": opts["max_seqs"], "token_major": opts["token_major"], "head_major": opts["head_major"]}

    def __init__(self, layout: KVLayout, budget: MemoryBudget, max_seqs: int = 64, owner: str = "kv",
                 token_major: bool | None = None, head_major: bool = False) -> None:
        super().__init__(layout, budget, max_seqs=max_seqs, eager_pages=0, prefault=False, owner=owner,
                         token_major=token_major, head_major=head_major, prefix_caching=False)
        need = self.num_slots * self.slot_bytes
        with self._lock:
            for slot in range(self.num_slots):
                if not self._try_commit_to(slot, self.seg_pages):
                    self.close()  # gives back what the slots before it took
                    raise MemoryBudgetExceeded(
                        f"the preallocated KV cache commits {format_bytes(need)} up front ({max_seqs} sequence slot(s) "
                        f"x {layout.max_seq_len} tokens x {format_bytes(self.slot_bytes // layout.max_seq_len)} per "
                        f"token) but its budget holds {format_bytes(budget.limit_bytes)}; lower --max-model-len or "
                        f"--max-num-seqs, raise the budget, or use --kv-cache virtual (pages on demand)")
            self._empty = []
            self._idle = set(range(self.num_slots))  # free slots, each holding its full-length pages

    def _try_place(self, num_tokens: int, final_tokens: int | None = None) -> _Seq | None:
        if not self._idle:
            return None  # every slot holds a live sequence
        slot = min(self._idle)  # the lowest free slot: a batch of consecutive slots reads its KV as one view
        self._idle.discard(slot)
        self._idle_since.pop(slot, None)
        return _Seq(slot=slot)

    def _reclaimable(self, exclude: int | None = None) -> int:
        return 0  # a free slot keeps its pages: the footprint is fixed

    def _reclaim(self, nbytes: int | None, exclude: int | None = None) -> int:
        return 0

    def reclaim_idle(self, watermark_bytes: int, idle_s: float, now: float | None = None, keep_slots: int = 0) -> int:
        return 0

    def waste_bound_bytes(self) -> int:
        """Committed - used can be everything not written: the cache holds every slot at full length."""
        return self.committed_bytes
