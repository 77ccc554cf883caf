"""KV-cache managers behind one interface (`KVCacheManager`): `virtual` (vAttention, default) and `paged`
(vLLM-style block pool, the baseline). Pick one with `create_kv_cache`."""
from __future__ import annotations

import inspect

from memfit.llm.kv.base import KVCacheError, KVCacheManager, KVLayout, KVStats, SeqStep
from memfit.memory.budget import MemoryBudget

KV_KINDS = ("virtual", "paged")

__all__ = ["KV_KINDS", "KVCacheError", "KVCacheManager", "KVLayout", "KVStats", "SeqStep", "create_kv_cache"]


def create_kv_cache(kind: str, layout: KVLayout, budget: MemoryBudget, **opts: object) -> KVCacheManager:
    """Build a KV cache of `kind` ("virtual" or "paged").

    Options - virtual: max_seqs (concurrent sequences; virtual space is reserved for each, default 64),
    eager_pages, prefault, owner. paged: block_size (default 16), num_blocks, max_seqs (caps the pool),
    owner.
    """
    if kind == "virtual":
        from memfit.llm.kv.virtual import VirtualKVCache as cls
    elif kind == "paged":
        from memfit.llm.kv.paged import PagedKVCache as cls  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown KV cache kind {kind!r}; choose one of {', '.join(KV_KINDS)}")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(opts) - set(params) - {"self", "layout", "budget"})
    if unknown:
        allowed = [p for p in params if p not in ("self", "layout", "budget")]
        raise ValueError(f"unknown option(s) {unknown} for the {kind} KV cache; it takes {allowed}")
    return cls(layout, budget, **opts)  # type: ignore[arg-type]
