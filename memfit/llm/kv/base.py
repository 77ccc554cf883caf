"""The KV-cache manager interface shared by the `virtual` (vAttention) and `paged` (vLLM-style) caches.

Two kinds of callers, two halves of the interface:
- the *scheduler* does bookkeeping only (`can_allocate`, `allocate`, `can_grow`, `grow`, `free`): it decides
  which sequences hold how many tokens of capacity and never sees a tensor;
- the *runner* moves tensors: once per step it calls `plan_step` (all index arithmetic for the step is done
  there, once, not once per layer), then per layer `write` the step's new K/V and read the context back
  with `context` (one sequence, prefill) or `context_batch` (all sequences padded, decode).

Every byte of physical memory a manager commits is reserved in its `MemoryBudget` first, so a manager
never takes the process past its budget: growth that does not fit raises `MemoryBudgetExceeded` (or
returns False from `can_*`), and the scheduler reacts by queueing or preempting.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

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

    @property
    def end(self) -> int:
        return self.start + self.num_new


class KVCacheManager(ABC):
    kind: str = ""  # set by @register_kv_cache
    layout: KVLayout
    budget: MemoryBudget

    @classmethod
    def engine_options(cls, *, max_num_seqs: int, block_size: int, token_major: bool | None) -> dict[str, Any]:
        """The constructor options this manager takes from the engine's config (EngineConfig's max_num_seqs,
        block_size and kv_layout): each manager picks what applies to it."""
        return {}

    # ---- scheduler side: bookkeeping, no tensors -------------------------------------------------
    @abstractmethod
    def can_allocate(self, num_tokens: int) -> bool:
        """Could a new sequence get capacity for `num_tokens` tokens now?"""

    @abstractmethod
    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Start a sequence with capacity for `num_tokens`. Raises MemoryBudgetExceeded if it won't fit."""

    @abstractmethod
    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        """Could `seq_id`'s capacity reach `num_tokens` total tokens now?"""

    @abstractmethod
    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Ensure capacity for `num_tokens` total tokens (no-op if already there)."""

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Release a sequence; its memory becomes reusable (possibly lazily, see the virtual cache)."""

    @abstractmethod
    def capacity(self, seq_id: int) -> int:
        """Tokens `seq_id` may hold without another `grow`."""

    @abstractmethod
    def num_tokens(self, seq_id: int) -> int:
        """Tokens whose K/V have been written for `seq_id`."""

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Forget the K/V of positions >= num_tokens (capacity is kept). Used when a new conversation
        turn shares only a prefix with the tokens cached for the previous one."""
        raise NotImplementedError

    def bytes_needed(self, num_tokens: int) -> int:
        """Bytes one sequence of `num_tokens` commits, with this manager's rounding (pages, blocks).
        Managers override this with their exact figure; the engine uses it to refuse up front a request
        that could never fit the budget."""
        return num_tokens * self.layout.bytes_per_token

    def has_seq(self, seq_id: int) -> bool:
        try:
            self.capacity(seq_id)
        except KVCacheError:
            return False
        return True

    # ---- runner side: tensors ---------------------------------------------------------------------
    @abstractmethod
    def plan_step(self, steps: list[SeqStep], pad_to: int = 1) -> Any:
        """Precompute this step's write/read indices once; the result is passed to write/context.

        pad_to: `context_batch` returns at least the longest sequence, rounded up to a multiple of `pad_to`
        (capped at max_seq_len). Attention kernels then see few distinct shapes: oneDNN caches a primitive
        per matmul shape, so a length that grows by one every step would otherwise grow memory every step."""

    @abstractmethod
    def write(self, layer: int, plan: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new K/V: k, v (N, Hkv, D), N = sum of num_new, in `steps` order."""

    @abstractmethod
    def context(self, layer: int, plan: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of sequence i of the step, positions 0 .. end-1: each (end, Hkv, D)."""

    def strided(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(K, V) of `layer` as (slots, max_len, Hkv, D) views, when this cache keeps every sequence at a fixed
        stride (plan.slots index them); None otherwise. Lets an attention kernel read in place."""
        return None

    @abstractmethod
    def context_batch(self, layer: int, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of all the step's sequences, padded to the longest (rounded up to `pad_to`): each
        (B, Lpad, Hkv, D). Positions at or past a sequence's `end` hold garbage (finite) and must be masked."""

    # ---- accounting -------------------------------------------------------------------------------
    @abstractmethod
    def stats(self) -> KVStats:
        """Committed/used bytes and tokens held, for metrics and the memory timeline."""

    def close(self) -> None:
        """Release all memory. Tensors obtained from the cache must not be used afterwards."""
