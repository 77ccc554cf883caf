"""`virtual` KV cache (vAttention): every sequence's K/V is contiguous in virtual memory, physical pages
are committed on demand.

Layout. One `VirtualArena` holds `max_seqs` slots. A slot is 2 x layers *segments*, one per (layer, K|V),
each `max_seq_len x Hkv x D` elements rounded up to whole pages; slot s, layer l, K|V j starts at byte
`s * slot_bytes + (2l + j) * seg_bytes`. So for each layer, K and V are each one strided tensor
`(max_seqs, max_seq_len, Hkv, D)`, and a sequence in slot s reads `K[l][s, :len]` - a view, no copy.
`context_batch` returns the view `K[l][lo:hi, :Lmax]` when the step's slots are consecutive and in order,
and gathers the rows otherwise, so *the runner should order decode batches by slot* (`slot_of`).

Token-major layout (`token_major=True`, the default on CUDA). A slot is one segment of `max_seq_len` rows,
a row holding one token's K and V of every layer; K[l] and V[l] are strided views into it (token stride
2 x layers x Hkv x D elements). Views stay plain strided tensors, but a sequence now leaves at most one
partly filled page in total instead of one per (layer, K|V): what matters with the GPU's 2 MiB pages,
where the per-segment layout commits 2 x layers pages for even the shortest sequence. On a CPU the
per-segment layout (4 KiB pages) keeps each layer's K rows adjacent, which the attention reads prefer.

Head-major layout (`head_major=True`, CPU): a segment per (layer, K|V, KV head), so each head's rows of a
sequence are one contiguous run that the attention kernel streams (benchmarks/kv_cache.py: 1.4-1.7x faster
decode attention than the per-layer layout, whose head rows sit Hkv x D apart). The views keep their shape;
the cost is at most one partly filled page per (layer, K|V, head) instead of per (layer, K|V).

Physical memory. A slot's segments all hold the same number of committed pages P (a prefix of each
segment). Every page is reserved in the budget (owner "kv") before it is committed.
- eager allocation: growing to n tokens commits ceil(n x row / page) pages plus `eager_pages` more (when
  the budget has room), so most grows are free; never past the pages of the sequence's final length when
  try_allocate is told it (`final_tokens`: a max_tokens=1 prefill of 128 tokens, 512-byte rows, commits
  16 pages a segment, not 18);
- overlapped prefault: with `prefault=True` those ahead pages are committed on a background thread, and
  a sequence that enters its ahead zone asks for the next ones, so page faults leave the decode path;
- deferred reclamation: `free` keeps the slot's pages; the next sequence takes the idle slot that fits it
  best (surplus beyond its need + eager is trimmed). Idle pages are decommitted when a commit would not fit
  the budget, by `reclaim()`, or by `reclaim_idle` once idle for the engine's `kv_reclaim_idle_s`, which leaves
  as many of the slots due as there are sequences about to be placed (`keep_slots`) for them to take: their
  pages are overwritten, not decommitted and committed again (vAttention's reclamation, lazy at admission).

Prefix sharing (`prefix_caching=True`, CPU): the arena is a `SharedArena` over a memfd, so a sequence can map a
cached prefix's physical pages at the start of its own slot; kv/virtual_prefix.py has the details.

Waste bound (`waste_bound_bytes` computes it; the tests check it against the pages the kernel holds):
with row = Hkv x D x itemsize (x 2 x layers if token-major) and requested = the largest size asked of
try_allocate/try_grow (or the tokens written, if more),
    committed - used <= sum over live sequences of segments x [(requested - written) x row
                                                                 + (1 + eager_pages) x page]
                        + idle bytes (pages of free slots, reclaimable at any time),
i.e. at most one partly filled page per (layer, K|V) segment per sequence, plus the eager pages, plus
capacity asked for but not yet written, plus idle reclaimable slots.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any

from memfit.llm.kv.base import KVCacheManager, KVLayout, SeqRecord
from memfit.llm.kv.registry import register_kv_cache
from memfit.llm.kv.virtual_io import VirtualIOMixin
from memfit.llm.kv.virtual_prefix import VirtualPrefixMixin
from memfit.memory.budget import MemoryBudget
from memfit.memory.vmem import VirtualArena, VirtualMemoryError
from memfit.memory.vmem_shared import SharedArena

log = logging.getLogger(__name__)


@dataclass
class _Seq(SeqRecord):
    slot: int = 0  # the sequence's row in the strided K/V views


@register_kv_cache("virtual")
class VirtualKVCache(VirtualIOMixin, VirtualPrefixMixin, KVCacheManager):
    fixed_stride = True  # K[l][slot, pos]: one strided view per layer
    _record_type = _Seq  # what the prefix mixin builds a sequence's record with

    @classmethod
    def engine_options(cls, *, max_num_seqs: int, block_size: int, kv_layout: str = "auto",
                       prefault: bool = True, eager_pages: int | None = None, prefix_caching: bool = False,
                       block_groups: bool = False) -> dict:
        # a slot of virtual space per sequence; kv_layout: EngineConfig's name for the page layout
        token_major = {"auto": None, "per-layer": False, "token-major": True, "head-major": False}[kv_layout]
        return {"max_seqs": max_num_seqs, "token_major": token_major, "head_major": kv_layout == "head-major",
                "prefault": prefault, "eager_pages": eager_pages, "prefix_caching": prefix_caching}

    def __init__(
        self,
        layout: KVLayout,
        budget: MemoryBudget,
        max_seqs: int = 64,
        eager_pages: int | None = None,
        prefault: bool = True,
        owner: str = "kv",
        token_major: bool | None = None,
        head_major: bool = False,
        prefix_caching: bool = False,
    ) -> None:
        if max_seqs <= 0:
            raise ValueError(f"max_seqs must be positive, got {max_seqs}")
        super().__init__(layout, budget)
        self.max_seqs, self.owner = max_seqs, owner
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        self.token_major, self.head_major, self.row_bytes, self.num_segments, self.seg_bytes = self._geometry(
            layout, token_major, head_major)
        self.slot_bytes = self.num_segments * self.seg_bytes
        probe_page = VirtualArena.page_size_for(layout.device)
        if prefix_caching and layout.device.type != "cpu":
            # Page aliasing needs one physical allocation mapped at several addresses: on CUDA that is
            # cuMemCreate + several cuMemMap, not written yet. The cache runs without sharing there.
            log.warning("prefix caching by page aliasing is CPU-only for the virtual KV cache; it is off on %s",
                        layout.device)
            prefix_caching = False
        if prefix_caching and self.prefix_geometry(self.row_bytes, probe_page)[0] > layout.max_seq_len // 2:
            # A block must be whole pages of every segment: with rows that tile pages badly (some token-major
            # shapes) or a very short context it would hold most of the context, and sharing would buy nothing.
            log.warning("prefix caching is off: a page-aligned block of this layout is %d tokens (%d-byte rows), "
                        "too coarse for %d positions", self.prefix_geometry(self.row_bytes, probe_page)[0],
                        self.row_bytes, layout.max_seq_len)
            prefix_caching = False
        # With prefix caching, as many slots again hold finished sequences' pages for reuse (address space is free).
        self.num_slots = max_seqs * (2 if prefix_caching else 1)
        if prefix_caching:
            self.arena = SharedArena(self.num_slots * self.slot_bytes, budget, owner)
        else:
            self.arena = VirtualArena(self.num_slots * self.slot_bytes, layout.device, budget, owner)
        self.page = self.arena.page_size
        assert self.page == probe_page
        self.seg_pages = self.seg_bytes // self.page
        # 4 KiB CPU pages are cheap to commit ahead; a 2 MiB GPU page already holds thousands of tokens, so one
        # page ahead is enough there to keep the driver's map calls off the scheduler's path.
        self.eager_pages = eager_pages if eager_pages is not None else (2 if layout.device.type == "cpu" else 1)
        if self.eager_pages < 0:
            raise ValueError(f"eager_pages must be >= 0, got {eager_pages}")
        # Per layer: K, V as (max_seqs, max_seq_len, Hkv, D) views with a page-aligned slot stride.
        isz = layout.itemsize
        shape = (self.num_slots, layout.max_seq_len, H, D)
        stride = (self.slot_bytes // isz, self.row_bytes // isz, self.seg_bytes // isz if self.head_major else D, 1)
        # Where (layer l, K|V j) starts: its own segment (H of them if head-major), or its H x D columns of every
        # token-major row.
        part = H * D * isz if self.token_major else self.seg_bytes * (H if self.head_major else 1)
        self.k = [self.arena.view(layout.dtype, shape, stride, 2 * l * part) for l in range(L)]
        self.v = [self.arena.view(layout.dtype, shape, stride, (2 * l + 1) * part) for l in range(L)]
        self._pages = [0] * self.num_slots  # committed pages per segment, per slot
        self._gen = [0] * self.num_slots  # bumped on free: stale prefault jobs see it and skip
        self._pending = [0] * self.num_slots  # highest page target queued on the prefault thread
        self._empty = list(range(self.num_slots))  # heap: free slots holding no pages
        self._idle: set[int] = set()  # free slots holding pages (deferred reclamation)
        self._idle_since: dict[int, float] = {}  # idle slot -> when it went idle (time.monotonic)
        self.commit_failures = 0  # commits the OS or driver refused (the sequence waited; nothing else failed)
        self._prefault_failures: list[str] = []  # background commits that failed, until the engine takes them
        self._seqs: dict[int, _Seq] = {}  # type: ignore[assignment]
        self._prefault = prefault and self.eager_pages > 0  # the prefault thread takes self._lock too
        self._closed = False
        if prefix_caching:
            self._init_prefix()

    @staticmethod
    def _geometry(layout: KVLayout, token_major: bool | None, head_major: bool) -> tuple[bool, bool, int, int, int]:
        """(token_major, head_major, row_bytes, num_segments, seg_bytes) of a slot in this layout."""
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        token_major = layout.device.type == "cuda" if token_major is None else bool(token_major)
        if head_major and token_major:
            raise ValueError("head_major and token_major are two different layouts; pick one")
        # row_bytes: one token of one segment; a segment is one (layer, K|V), one (layer, K|V, head) if head-major
        # (each head's rows one contiguous run: the attention kernel streams them), or the whole slot if token-major.
        row_bytes = (H if not head_major else 1) * D * layout.itemsize * (2 * L if token_major else 1)
        num_segments = 1 if token_major else 2 * L * (H if head_major else 1)
        page = VirtualArena.page_size_for(layout.device)
        return token_major, bool(head_major), row_bytes, num_segments, -(-layout.max_seq_len * row_bytes // page) * page

    @classmethod
    def full_sequence_bytes(cls, layout: KVLayout, token_major: bool | None = None, head_major: bool = False,
                            **_: Any) -> int:
        _, _, _, segments, seg_bytes = cls._geometry(layout, token_major, head_major)
        return segments * seg_bytes

    @classmethod
    def fixed_bytes(cls, layout: KVLayout, **_: Any) -> int:
        """On CUDA, the scratch page that backs reads of uncommitted pages (VirtualArena.make_readable) is
        charged to the KV budget: one page, 2 MiB on current GPUs. Nothing on the CPU (the zero page)."""
        return VirtualArena.page_size_for(layout.device) if layout.device.type == "cuda" else 0

    # ---- page arithmetic --------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.row_bytes // self.page)

    def bytes_needed(self, num_tokens: int) -> int:
        """Committed bytes one sequence of `num_tokens` needs (whole pages per segment; eager pages are
        taken only when the budget has room, so they are not part of the need)."""
        return self._slot_bytes(self.pages_for(num_tokens))

    def tokens_in(self, pages: int) -> int:
        return min(self.layout.max_seq_len, pages * self.page // self.row_bytes)

    def _ranges(self, slot: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Byte ranges of pages [lo, hi) of every segment of `slot`."""
        base = slot * self.slot_bytes + lo * self.page
        return [(base + j * self.seg_bytes, (hi - lo) * self.page) for j in range(self.num_segments)]

    def _slot_bytes(self, pages: int) -> int:
        return pages * self.num_segments * self.page

    # ---- scheduler side (base class hooks, called under self._lock) ---------------------------------
    def _pick_slot(self, need: int) -> int | None:
        """Best idle slot: the fewest pages >= need, else the most pages; else the lowest empty slot."""
        fits = [s for s in self._idle if self._pages[s] >= need]
        if fits:
            return min(fits, key=lambda s: (self._pages[s], s))
        if self._idle:
            return max(self._idle, key=lambda s: (self._pages[s], -s))
        return self._empty[0] if self._empty else None

    def _reclaimable(self, exclude: int | None = None) -> int:
        if self.prefix_caching:
            return self._reclaimable_prefix(exclude)
        return sum(self._slot_bytes(self._pages[s]) for s in self._idle if s != exclude)

    def _queued_bytes(self, exclude: int | None = None) -> int:
        """Budget the prefault thread is about to take for other slots' eager pages. An attempt counts it as
        taken, so whether it fits does not depend on whether that thread has run yet."""
        return sum(
            self._slot_bytes(self._pending[s] - self._pages[s])
            for s in range(self.num_slots)
            if s != exclude and self._pending[s] > self._pages[s]
        )

    def _try_place(self, num_tokens: int, final_tokens: int | None = None) -> _Seq | None:
        if self.prefix_caching:  # no tokens given: a sequence that shares nothing
            placed = self._try_place_prefix((), num_tokens, final_tokens)
            return None if placed is None else placed[0]  # type: ignore[return-value]
        need = self.pages_for(num_tokens)
        slot = self._pick_slot(need)
        if slot is None or not self._try_commit_to(slot, need):
            return None  # every slot holds a live sequence (max_seqs), or the budget is short
        if slot in self._idle:
            self._idle.discard(slot)
            self._idle_since.pop(slot, None)
        else:
            self._empty.remove(slot)
            heapq.heapify(self._empty)
        keep = min(self.seg_pages, need + self.eager_pages)
        if self._pages[slot] > keep:  # an inherited surplus would break the waste bound: trim it
            self.arena.decommit_many(self._ranges(slot, keep, self._pages[slot]))
            self._pages[slot] = keep
        self._ahead(slot, need, final_tokens)
        return _Seq(slot=slot)

    def _try_extend(self, record: _Seq, num_tokens: int) -> bool:  # type: ignore[override]
        need = self.pages_for(num_tokens)
        if self.prefix_caching and not self._cow(record.slot, record.written):
            return False  # the pages it would write are shared and the copies do not fit
        if not self._try_commit_to(record.slot, need):
            return False
        self._ahead(record.slot, need, record.final_tokens)
        return True

    def _release(self, record: _Seq) -> None:  # type: ignore[override]
        self._gen[record.slot] += 1
        self._pending[record.slot] = 0
        if self.prefix_caching:
            self._release_prefix(record)
        elif self._pages[record.slot]:
            self._idle.add(record.slot)  # keep the pages: the next sequence reuses them
            self._idle_since[record.slot] = time.monotonic()
        else:
            heapq.heappush(self._empty, record.slot)

    def _capacity_of(self, record: _Seq) -> int:  # type: ignore[override]
        return self.tokens_in(self._pages[record.slot])

    def slot_of(self, seq_id: int) -> int:
        """The slot holding `seq_id`; order decode batches by it so `context_batch` is a view."""
        return self._seq(seq_id).slot  # type: ignore[attr-defined]

    # ---- commit / reclaim -------------------------------------------------------------------------
    def _try_commit_to(self, slot: int, need: int) -> bool:
        """Commit `slot` up to `need` pages now, decommitting idle slots if the budget is short; False,
        with nothing changed, when even that would not fit. Runs under self._lock, which the prefault
        thread takes too, so no background commit lands between the check and the commit; eager pages
        queued for other slots count as taken either way (`_queued_bytes`)."""
        have = self._pages[slot]
        if need <= have:
            return True
        deficit = self._slot_bytes(need - have)
        if self.layout.device.type == "cuda" and not self.arena.scratch_bytes:
            # The next batched read may map the GPU scratch page (see plan_step), which takes a page of
            # the budget: leave room for it, or that read would fail after the scheduler admitted the step.
            deficit += self.page
        short = deficit - (self.budget.available_bytes - self._queued_bytes(exclude=slot))
        if short > 0:
            if short > self._reclaimable(exclude=slot):
                return False
            self._reclaim(short, exclude=slot)
        # The budget's other owners (if any) may have taken what was free: the commit itself is all or nothing.
        # The OS or the driver may still refuse memory the budget allowed (another process took it): the arena
        # has rolled back, and the sequence that asked waits or is preempted like any other that does not fit.
        try:
            if not self.arena.try_commit_many(self._ranges(slot, have, need)):
                return False
        except VirtualMemoryError as exc:
            self.commit_failures += 1
            self.last_refused = True
            log.warning("KV commit of %d pages refused: %s; the sequence waits", need - have, exc)
            return False
        self._pages[slot] = need
        return True

    def _ahead(self, slot: int, need: int, final_tokens: int | None = None) -> None:
        """Eager allocation: make sure `eager_pages` pages beyond `need` are committed or on their way, but none
        past the pages of `final_tokens` (the sequence's final length, when known): those would never be written."""
        target = min(self.seg_pages, need + self.eager_pages)
        if final_tokens is not None:
            target = min(target, max(need, self.pages_for(final_tokens)))
        if target <= max(self._pages[slot], self._pending[slot]):
            return
        if not self._prefault:
            try:
                if self.arena.try_commit_many(self._ranges(slot, self._pages[slot], target)):
                    self._pages[slot] = target
            except VirtualMemoryError:
                self.commit_failures += 1  # ahead pages are optional: the next grow commits what it needs
            return
        self._pending[slot] = target
        gen = self._gen[slot]

        def job() -> None:  # on the prefault thread
            with self._lock:
                if self._closed or self._gen[slot] != gen or self._pages[slot] >= target:
                    return
                try:
                    ok = self.arena.try_commit_many(self._ranges(slot, self._pages[slot], target))
                except Exception as exc:  # noqa: BLE001 - reported to the engine, never lost on this thread
                    ok = False
                    self._prefault_failures.append(f"{type(exc).__name__}: {exc}")
                if ok:
                    self._pages[slot] = target
                else:  # no room, or refused: drop the queued reservation (the arena rolled its budget back)
                    self._pending[slot] = self._pages[slot]

        self.arena.prefaulter.submit(job)

    def _reclaim(self, nbytes: int | None, exclude: int | None = None) -> int:
        if self.prefix_caching:
            return self._reclaim_prefix(nbytes, exclude)
        take, freed = [], 0
        for slot in sorted(self._idle, key=lambda s: -self._pages[s]):
            if nbytes is not None and freed >= nbytes:
                break
            if slot == exclude:
                continue
            take.append(slot)
            freed += self._slot_bytes(self._pages[slot])  # an idle slot's pages [0, P) are all committed, its own
        return self._decommit_idle(take)

    def _decommit_idle(self, slots: list[int]) -> int:
        """Decommit idle `slots` whole, in one arena call (one lock, one budget release, adjacent runs merged,
        instead of one of each per slot); returns the bytes freed."""
        if not slots:
            return 0
        freed = self.arena.decommit_many([r for slot in slots for r in self._ranges(slot, 0, self._pages[slot])])
        for slot in slots:
            self._pages[slot] = 0
            self._idle.discard(slot)
            self._idle_since.pop(slot, None)
            heapq.heappush(self._empty, slot)
        return freed

    def reclaim_idle(self, watermark_bytes: int, idle_s: float, now: float | None = None, keep_slots: int = 0) -> int:
        """Give back idle slots that have been idle for `idle_s` seconds or more, oldest first, while the idle
        bytes exceed `watermark_bytes`; returns the bytes given back. Recently freed slots stay for reuse.
        Called at every engine step: with nothing old enough it returns after one pass over the idle slots.

        keep_slots: new sequences about to be placed (the engine passes its waiting requests). Up to that many of
        the slots due to go back stay, with their pages, for those sequences to take (vAttention's deferred
        reclamation: a stale slot's pages are overwritten, not decommitted and committed again); the rest go back
        now, and what the sequences leave goes back at the next call that has fewer of them waiting."""
        now = time.monotonic() if now is None else now
        freed = 0
        with self._lock:
            if self.prefix_caching:
                return self._reclaim_idle_prefix(watermark_bytes, idle_s, now, keep_slots)
            due = [s for s in self._idle if now - self._idle_since.get(s, now) >= idle_s]
            if due:
                idle, take = self._reclaimable(), []
                for slot in sorted(due, key=lambda s: self._idle_since[s]):  # oldest first, down to the watermark
                    if idle <= watermark_bytes:
                        break
                    take.append(slot)
                    idle -= self._slot_bytes(self._pages[slot])  # what _reclaimable counts for it
                # The newest of them stay for the sequences about to be placed: _pick_slot prefers an idle slot to
                # an empty one, so they take these pages (trimmed to their need) instead of committing new ones.
                freed = self._decommit_idle(take[: max(0, len(take) - keep_slots)])
            if not self._seqs and not self._idle:
                self.arena.drop_scratch()
        return freed

    def take_prefault_failures(self) -> list[str]:
        """Background commits that failed since the last call (each rolled back; the engine reports them)."""
        with self._lock:
            failures, self._prefault_failures = self._prefault_failures, []
            return failures

    def reclaim(self, nbytes: int | None = None) -> int:
        """Decommit idle slots (all of them by default); returns the bytes given back."""
        with self._lock:
            freed = self._reclaim(nbytes)
            if not self._seqs:
                self.arena.drop_scratch()
            return freed

    def sync(self) -> None:
        """Wait for queued prefaults (tests and benchmarks call this before reading stats)."""
        self.arena.drain()

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def committed_bytes(self) -> int:
        return self.arena.committed_bytes

    @property
    def idle_bytes(self) -> int:
        """Committed bytes of free slots kept for reuse (reclaimable at any time)."""
        with self._lock:
            return self._reclaimable()

    @property
    def num_free_slots(self) -> int:
        with self._lock:
            return self.max_seqs - len(self._seqs)

    def waste_bound_bytes(self) -> int:
        """The module docstring's bound on committed - used bytes for the current state."""
        with self._lock:
            per_seq = sum(
                (max(s.requested, s.written) - s.written) * self.row_bytes + (1 + self.eager_pages) * self.page
                for s in self._seqs.values()
            )
            return self.num_segments * per_seq + self._reclaimable() + self.arena.scratch_bytes

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._seqs.clear()
            self.k, self.v = [], []
        self.arena.close()  # stops the prefault thread, decommits, returns the budget
