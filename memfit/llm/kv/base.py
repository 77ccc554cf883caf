"""The KV-cache manager interface shared by the `virtual` (vAttention) and `paged` (vLLM-style) caches.

Two kinds of callers, two halves of the interface:
- the *scheduler* does bookkeeping only (`try_allocate`, `try_grow`, `free`): it decides which sequences
  hold how many tokens of capacity and never sees a tensor;
- the *runner* moves tensors: once per step it calls `plan_step` (all index arithmetic for the step is done
  there, once, not once per layer), then per layer `write` the step's new K/V and read the context back
  with `context` (one sequence, prefill) or `context_batch` (all sequences padded, decode).

Capacity is taken by attempt, as `MemoryBudget.try_reserve` does: `try_allocate`/`try_grow` either take it
(and reserve every byte they commit in the `MemoryBudget` first) or change nothing and return False, and
the scheduler reacts by queueing or preempting. There is no ask-then-act: a check and the act that follows
could disagree once a background thread (the virtual cache's prefaulter) commits in between. Misuse
(an unknown or duplicate sequence, a length outside 0..max_seq_len) raises `KVCacheError` instead.

This class keeps the per-sequence bookkeeping every manager shares (`SeqRecord`: tokens written, largest
capacity asked), validates step plans, and does `truncate`, `num_tokens`, `has_seq` and the `stats()`
arithmetic. A manager supplies only where a sequence's memory lives (pages of a slot, blocks of a pool):
the `_try_place`, `_try_extend`, `_release`, `_capacity_of`, `_plan` hooks and `committed_bytes`.

Layout capabilities are declared here with defaults, off by default; attention kernels that read the cache
in place (and the runner's slot ordering) ask for them by these flags:
- `fixed_stride`: every sequence sits at a fixed stride in per-layer K/V views: `strided(layer)` returns
  them, `slot_of(seq_id)` gives a sequence's row in them, and step plans carry `slots` and `ends`;
- `block_tables`: every sequence lives in fixed-size blocks of per-layer pools: `pools(layer)` returns the
  (num_blocks, block_size, Hkv, D) K and V pools (block_size a power of two), and step plans carry `ends`
  and `batch_table`, a (B, nb) int64 tensor whose row i lists step i's block ids in position order
  (covering 0 .. ends[i]-1; the rest of the row is padding that a reader must not follow).

Automatic prefix caching (`prefix_caching`, kv/prefix.py): a manager that supports it starts a sequence with
`try_allocate_prefix(seq_id, token_ids, n)`, which maps the K/V of the longest cached prefix of `token_ids` (a
live or finished sequence's full blocks) into the new sequence and returns how many tokens it need not
prefill. The runner passes each step's token ids (`SeqStep.token_ids`), so the cache knows which tokens every
position holds; full blocks are hashed as they are written. A manager supplies `_try_place_prefix` and the
`_blocks_full` / `_blocks_dropped` hooks; writing into a block another sequence shares copies it first.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from memfit.llm.kv.prefix import PrefixStats, chain_hashes
from memfit.memory.budget import MemoryBudget


class KVCacheError(RuntimeError):
    """Misuse of a KV cache (unknown sequence, writing past capacity, ...)."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of the cache. K and V of one token in one layer are (num_kv_heads, head_dim) each."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_seq_len: int  # longest sequence (prompt + output) the cache must hold
    device: torch.device = torch.device("cpu")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_bytes_per_layer(self) -> int:
        """K + V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """K + V of one token across all layers: 2 x layers x kv_heads x head_dim x itemsize."""
        return self.num_layers * self.token_bytes_per_layer


@dataclass
class KVStats:
    committed_bytes: int  # physical memory held (pages mapped / blocks allocated), idle reserves included
    used_bytes: int  # bytes holding written tokens: tokens_held x bytes_per_token
    tokens_held: int
    num_seqs: int
    budget_bytes: int

    @property
    def waste_bytes(self) -> int:
        return self.committed_bytes - self.used_bytes


@dataclass
class SeqStep:
    """One sequence's part of a step: `num_new` tokens written at positions start .. start+num_new-1."""

    seq_id: int
    start: int
    num_new: int
    token_ids: Sequence[int] | None = None  # the tokens written (prefix caching hashes them); None: unknown

    @property
    def end(self) -> int:
        return self.start + self.num_new


@dataclass
class SeqRecord:
    """What the base class keeps per sequence; a manager subclasses it with the sequence's placement."""

    requested: int = 0  # largest capacity asked of try_allocate / try_grow
    written: int = 0  # tokens whose K/V are held: positions 0 .. written-1
    tokens: list[int] = field(default_factory=list)  # prefix caching: token ids of positions 0 .. len-1
    hashes: list[int] = field(default_factory=list)  # prefix caching: chained hashes of its full blocks
    # The most tokens whose K/V this sequence will ever hold, if the caller knows it (try_allocate's
    # final_tokens): a manager that commits ahead of the writes (the virtual cache's eager pages) stops there.
    final_tokens: int | None = None


class KVCacheManager(ABC):
    kind: ClassVar[str] = ""  # set by @register_kv_cache
    fixed_stride: ClassVar[bool] = False  # see the module docstring; True needs strided() and slot_of()
    block_tables: ClassVar[bool] = False  # see the module docstring; True needs pools()
    layout: KVLayout
    budget: MemoryBudget

    def __init__(self, layout: KVLayout, budget: MemoryBudget) -> None:
        self.layout, self.budget = layout, budget
        # Set by the last try_allocate/try_grow that failed because the OS or driver refused memory the budget
        # allowed (not because the budget was short): freeing other sequences' budget would not help it.
        self.last_refused = False
        self._seqs: dict[int, SeqRecord] = {}
        self._lock = threading.RLock()  # background work (the virtual cache's prefaulter) takes it too
        self.prefix_caching = False  # a manager that supports it turns it on (see the module docstring)
        self.prefix_block = 0  # tokens per hashed block when prefix_caching
        self.prefix_stats = PrefixStats()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.fixed_stride and (cls.strided is KVCacheManager.strided or cls.slot_of is KVCacheManager.slot_of):
            raise TypeError(f"{cls.__qualname__} declares fixed_stride but does not define strided() and slot_of()")
        if cls.block_tables and cls.pools is KVCacheManager.pools:
            raise TypeError(f"{cls.__qualname__} declares block_tables but does not define pools()")

    @classmethod
    def engine_options(cls, *, max_num_seqs: int, block_size: int, kv_layout: str = "auto",
                       prefault: bool = True, eager_pages: int | None = None,
                       prefix_caching: bool = False, block_groups: bool = False) -> dict[str, Any]:
        """The constructor options this manager takes from the engine's config (EngineConfig's max_num_seqs,
        block_size, kv_layout, kv_prefault, kv_eager_pages, enable_prefix_caching and kv_block_groups): each manager picks
        what applies to it."""
        return {}

    # ---- scheduler side: bookkeeping, no tensors -------------------------------------------------
    def try_allocate(self, seq_id: int, num_tokens: int, final_tokens: int | None = None) -> bool:
        """Start `seq_id` with capacity for `num_tokens` tokens if memory allows; otherwise change nothing
        and return False. Raises KVCacheError if `seq_id` is already held or the length is out of range.
        `final_tokens`: the most tokens whose K/V the sequence will ever hold, if known (prompt + max_tokens - 1:
        the last sampled token is never fed back); memory taken ahead of the writes stops there. A hint only:
        try_grow past it still works."""
        with self._lock:
            self.last_refused = False
            if seq_id in self._seqs:
                raise KVCacheError(f"sequence {seq_id} is already allocated")
            self._check_len(num_tokens)
            record = self._try_place(num_tokens, final_tokens)
            if record is None:
                return False
            record.requested = num_tokens
            record.final_tokens = final_tokens
            self._seqs[seq_id] = record
            return True

    def try_allocate_prefix(self, seq_id: int, token_ids: Sequence[int], num_tokens: int,
                            final_tokens: int | None = None) -> int | None:
        """Start `seq_id`, whose tokens are `token_ids`, reusing the K/V of their longest cached prefix (at
        most len - 1 tokens: the last one is always computed, it yields the logits), with capacity for
        `num_tokens` more tokens after it (capped at the length of `token_ids`). Returns the number of cached
        tokens (0 without prefix caching or a hit), or None with nothing changed when memory is short.
        `final_tokens`: as for try_allocate."""
        with self._lock:
            if not self.prefix_caching:
                return 0 if self.try_allocate(seq_id, num_tokens, final_tokens) else None
            self.last_refused = False
            if seq_id in self._seqs:
                raise KVCacheError(f"sequence {seq_id} is already allocated")
            self._check_len(num_tokens)
            self._check_len(len(token_ids))
            placed = self._try_place_prefix(token_ids, num_tokens, final_tokens)
            if placed is None:
                return None
            record, cached = placed
            record.final_tokens = final_tokens
            record.requested = max(record.requested, cached + min(len(token_ids) - cached, num_tokens))
            record.written = cached
            record.tokens = list(token_ids[:cached])
            self._seqs[seq_id] = record
            self.prefix_stats.record(len(token_ids), cached)
            return cached

    def try_grow(self, seq_id: int, num_tokens: int, final_tokens: int | None = None) -> bool:
        """Make `seq_id`'s capacity reach `num_tokens` total tokens (True at once if it already does), or
        change nothing and return False. `final_tokens`: as for try_allocate, replacing the hint given before
        (a session's next turn goes on in the same sequence, with a final length of its own)."""
        with self._lock:
            self.last_refused = False
            record = self._seq(seq_id)
            self._check_len(num_tokens)
            hint = record.final_tokens
            if final_tokens is not None:
                record.final_tokens = final_tokens
            if not self._try_extend(record, num_tokens):
                record.final_tokens = hint
                return False
            record.requested = max(record.requested, num_tokens)
            return True

    def free(self, seq_id: int) -> None:
        """Release a sequence; its memory becomes reusable (possibly lazily, see the virtual cache)."""
        with self._lock:
            record = self._seqs.pop(seq_id, None)
            if record is None:
                raise KVCacheError(f"unknown sequence {seq_id}")
            self._release(record)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Forget the K/V of positions >= num_tokens (capacity is kept). Used when a new conversation
        turn shares only a prefix with the tokens cached for the previous one."""
        if num_tokens < 0:
            raise KVCacheError(f"cannot truncate to {num_tokens} tokens")
        with self._lock:
            record = self._seq(seq_id)
            record.written = min(record.written, num_tokens)
            if self.prefix_caching:
                del record.tokens[num_tokens:]
                keep = num_tokens // self.prefix_block
                dropped, record.hashes = record.hashes[keep:], record.hashes[:keep]
                if dropped:
                    self._blocks_dropped(record, keep, dropped)

    def mark_restored(self, seq_id: int, num_tokens: int) -> None:
        """Positions 0 .. num_tokens-1 of `seq_id` hold K/V again, copied in from outside the cache (a swap-in,
        kv/swap.py); the capacity must be there already."""
        with self._lock:
            record = self._seq(seq_id)
            if num_tokens > self._capacity_of(record):
                raise KVCacheError(f"sequence {seq_id} holds {self._capacity_of(record)} tokens, not {num_tokens}")
            record.written = max(record.written, num_tokens)

    def capacity(self, seq_id: int) -> int:
        """Tokens `seq_id` may hold without another `try_grow`."""
        with self._lock:
            return self._capacity_of(self._seq(seq_id))

    def num_tokens(self, seq_id: int) -> int:
        """Tokens whose K/V have been written for `seq_id`."""
        return self._seq(seq_id).written

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    @classmethod
    def full_sequence_bytes(cls, layout: KVLayout, **options: Any) -> int:
        """Bytes one sequence at `layout.max_seq_len` commits with this manager's rounding (pages, blocks), for
        the manager built with `options` (what `engine_options` returns): the engine sizes the KV share from it
        before building the manager, so a full-length request is never refused for rounding alone."""
        return layout.max_seq_len * layout.bytes_per_token

    @classmethod
    def fixed_bytes(cls, layout: KVLayout, **options: Any) -> int:
        """Bytes the manager charges its budget beside its sequences' (none here; the virtual cache's CUDA
        scratch page). The default KV share adds it, so that every slot can still hold a full-length sequence."""
        return 0

    @classmethod
    def all_slots_bytes(cls, layout: KVLayout, num_seqs: int, **options: Any) -> int:
        """Budget for `num_seqs` sequences at full length: the default KV share when no kv_budget is given."""
        return num_seqs * cls.full_sequence_bytes(layout, **options) + cls.fixed_bytes(layout, **options)

    def bytes_needed(self, num_tokens: int) -> int:
        """Bytes one sequence of `num_tokens` commits, with this manager's rounding (pages, blocks).
        Managers override this with their exact figure; the engine uses it to refuse up front a request
        that could never fit the budget."""
        return num_tokens * self.layout.bytes_per_token

    def reclaim(self, nbytes: int | None = None) -> int:
        """Give back memory held for reuse but by no sequence (all of it by default); returns the bytes."""
        return 0

    def reclaim_idle(self, watermark_bytes: int, idle_s: float, now: float | None = None, keep_slots: int = 0) -> int:
        """Give back memory idle for `idle_s` seconds beyond `watermark_bytes` (managers that keep freed memory
        for reuse override this); returns the bytes. `keep_slots`: sequences about to be placed, which a manager
        may hand the memory due to go back instead of giving it back and committing new (kv/virtual.py)."""
        return 0

    def take_prefault_failures(self) -> list[str]:
        """Background commits that failed since the last call, each rolled back (managers with a prefaulter)."""
        return []

    def sync(self) -> None:
        """Wait for background work (tests and benchmarks call this before reading stats)."""

    def _check_len(self, num_tokens: int) -> None:
        if num_tokens < 0 or num_tokens > self.layout.max_seq_len:
            raise KVCacheError(f"{num_tokens} tokens is outside 0..max_seq_len={self.layout.max_seq_len}")

    def _seq(self, seq_id: int) -> SeqRecord:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KVCacheError(f"unknown sequence {seq_id}") from None

    def _track_tokens(self, st: SeqStep, record: SeqRecord) -> None:
        """Record the step's token ids and hash the blocks it completes."""
        if st.token_ids is None or st.start > len(record.tokens):
            return  # tokens unknown from here on: no further block of this sequence is cached
        del record.tokens[st.start :]
        record.tokens.extend(st.token_ids)
        first = len(record.hashes)
        if min(record.written, len(record.tokens)) // self.prefix_block > first:  # a block was completed
            record.hashes = chain_hashes(record.tokens, self.prefix_block, record.hashes, limit=record.written)
            self._blocks_full(record, first)

    # ---- prefix caching hooks (called under self._lock; only when prefix_caching) -------------------
    def _try_place_prefix(self, token_ids: Sequence[int], num_tokens: int,
                          final_tokens: int | None = None) -> tuple[SeqRecord, int] | None:
        """A record holding the longest cached prefix of `token_ids` and room for `num_tokens` more, and how
        many tokens it holds; None with nothing changed. `final_tokens`: try_allocate's hint."""
        raise NotImplementedError(f"{type(self).__qualname__} has no prefix caching")

    def _blocks_full(self, record: SeqRecord, first: int) -> None:
        """record.hashes[first:] were just completed: make them findable."""

    def _blocks_dropped(self, record: SeqRecord, first: int, hashes: list[int]) -> None:
        """Blocks first, first + 1, ... (`hashes`) no longer hold those tokens (truncate): forget them."""

    @property
    def cached_bytes(self) -> int:
        """Physical bytes held only for prefixes cached for reuse (no live sequence maps them)."""
        return 0

    # ---- what a manager supplies (called under self._lock) ---------------------------------------
    @abstractmethod
    def _try_place(self, num_tokens: int, final_tokens: int | None = None) -> SeqRecord | None:
        """Take memory for a new sequence of `num_tokens` tokens; its record, or None with nothing changed.
        `final_tokens`: try_allocate's hint (a manager that takes nothing ahead of the writes ignores it)."""

    @abstractmethod
    def _try_extend(self, record: SeqRecord, num_tokens: int) -> bool:
        """Make `record` hold capacity for `num_tokens` tokens, or return False with nothing changed."""

    @abstractmethod
    def _release(self, record: SeqRecord) -> None:
        """The sequence of `record` is gone: return its memory (now or lazily)."""

    @abstractmethod
    def _capacity_of(self, record: SeqRecord) -> int:
        """Tokens the memory held by `record` has room for (at most max_seq_len)."""

    @abstractmethod
    def _plan(self, steps: list[SeqStep], records: list[SeqRecord], read_len: int) -> Any:
        """The manager's index arithmetic for a validated step; read_len: context_batch's padded length."""

    @property
    @abstractmethod
    def committed_bytes(self) -> int:
        """Physical bytes held (pages mapped, blocks handed out), idle reserves included."""

    # ---- runner side: tensors ---------------------------------------------------------------------
    def plan_step(self, steps: list[SeqStep], pad_to: int = 1) -> Any:
        """Check the step against what each sequence holds, record its new tokens as written, and
        precompute its write/read indices once; the result is passed to write/context.

        pad_to: `context_batch` returns at least the longest sequence, rounded up to a multiple of `pad_to`
        (capped at max_seq_len). Attention kernels then see few distinct shapes: oneDNN caches a primitive
        per matmul shape, so a length that grows by one every step would otherwise grow memory every step."""
        with self._lock:
            if not steps:
                raise KVCacheError("plan_step needs at least one sequence")
            if len({st.seq_id for st in steps}) != len(steps):
                raise KVCacheError("a sequence appears twice in one step")
            records = [self._seq(st.seq_id) for st in steps]
            for st, record in zip(steps, records):
                if st.start < 0 or st.num_new < 0 or st.start > record.written:
                    raise KVCacheError(
                        f"sequence {st.seq_id}: step starts at {st.start} but only {record.written} tokens are held"
                    )
                cap = self._capacity_of(record)
                if st.end > cap:
                    raise KVCacheError(f"sequence {st.seq_id}: writing up to {st.end} needs try_grow(); capacity is {cap}")
            for st, record in zip(steps, records):
                record.written = max(record.written, st.end)
                if self.prefix_caching:
                    self._track_tokens(st, record)
            longest = max(st.end for st in steps)
            read_len = min(self.layout.max_seq_len, -(-longest // pad_to) * pad_to)
            return self._plan(steps, records, read_len)

    @abstractmethod
    def write(self, layer: int, plan: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new K/V: k, v (N, Hkv, D), N = sum of num_new, in `steps` order."""

    @abstractmethod
    def context(self, layer: int, plan: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of sequence i of the step, positions 0 .. end-1: each (end, Hkv, D)."""

    @abstractmethod
    def context_batch(self, layer: int, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of all the step's sequences, padded to the longest (rounded up to `pad_to`): each
        (B, Lpad, Hkv, D). Positions at or past a sequence's `end` hold garbage (finite) and must be masked."""

    # ---- layout capabilities (see fixed_stride) ------------------------------------------------
    def make_slots_readable(self, slots: list[tuple[int, int]]) -> None:
        """Make the first n positions of each (slot, n) of the `strided` views safe to read (a decode batch
        that bridges empty slots reads them); caches whose memory is always readable do nothing."""

    def strided(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(K, V) of `layer` as (slots, max_len, Hkv, D) views when `fixed_stride`; None otherwise."""
        return None

    def slot_of(self, seq_id: int) -> int | None:
        """`seq_id`'s row in the `strided` views when `fixed_stride`; None otherwise. Decode batches in
        slot order let a fixed-stride cache hand out one view instead of gathering."""
        return None

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(K, V) pools of `layer`, each (num_blocks, block_size, Hkv, D), when `block_tables`; None otherwise."""
        return None

    # ---- accounting -------------------------------------------------------------------------------
    def stats(self) -> KVStats:
        """Committed/used bytes and tokens held, for metrics and the memory timeline."""
        with self._lock:
            tokens = sum(record.written for record in self._seqs.values())
            return KVStats(
                committed_bytes=self.committed_bytes,
                used_bytes=tokens * self.layout.bytes_per_token,
                tokens_held=tokens,
                num_seqs=len(self._seqs),
                budget_bytes=self.budget.limit_bytes,
            )

    def close(self) -> None:
        """Release all memory. Tensors obtained from the cache must not be used afterwards."""
