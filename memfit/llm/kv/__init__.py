"""KV-cache managers behind one interface (`KVCacheManager`), registered by kind: `virtual` (vAttention,
default) and `paged` (vLLM-style block pool, the baseline). Build one with `create_kv_cache(kind, ...)`;
add one as a new file here with `@register_kv_cache("kind")` (kv/registry.py)."""
from __future__ import annotations

from memfit.llm.kv.base import KVCacheError, KVCacheManager, KVLayout, KVStats, SeqRecord, SeqStep
from memfit.llm.kv.registry import create_kv_cache, kv_cache_class, kv_kinds, register_kv_cache

__all__ = [
    "KVCacheError", "KVCacheManager", "KVLayout", "KVStats", "SeqRecord", "SeqStep", "create_kv_cache", "kv_cache_class",
    "kv_kinds", "register_kv_cache",
]
