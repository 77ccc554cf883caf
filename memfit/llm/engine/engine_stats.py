"""The engine's metrics snapshot and memory-timeline rows, read off its parts (kept apart from llm_engine.py, which
drives the steps)."""
from __future__ import annotations

from typing import Any

from memfit.llm.engine.swap_tiers import swap_stats, tier_timeline

# `engine` is an LLMEngine; typed Any because importing it here, even for type checking only, would make an import
# cycle with llm_engine.py (tests/test_architecture.py forbids those)
LLMEngine = Any


def record_timeline(engine: LLMEngine, step_tokens: int) -> None:
    """One row of the engine's memory timeline (benchmarks, `memfit bench --timeline`)."""
    st = engine.kv.stats()
    engine.timeline.record(  # type: ignore[union-attr]
        step=engine.num_steps, step_tokens=step_tokens, kv_committed_bytes=st.committed_bytes,
        kv_used_bytes=st.used_bytes, kv_waste_bytes=st.waste_bytes, tokens_held=st.tokens_held,
        kv_budget_bytes=st.budget_bytes, num_running=len(engine.scheduler.running),
        num_waiting=len(engine.scheduler.waiting),
        **tier_timeline(engine.swap),
    )


def engine_stats(engine: LLMEngine) -> dict:
    """A fresh snapshot for metrics (the server's /metrics, `memfit bench`)."""
    st = engine.kv.stats()
    return {
        "num_running": len(engine.scheduler.running), "num_waiting": len(engine.scheduler.waiting),
        "kv_committed_bytes": st.committed_bytes, "kv_used_bytes": st.used_bytes,
        "kv_waste_bytes": st.waste_bytes, "kv_budget_bytes": st.budget_bytes, "tokens_held": st.tokens_held,
        "num_steps": engine.num_steps, "generated_tokens": engine.num_generated_tokens,
        "workspace_bytes": engine.runner.workspace.nbytes,
        "step_arena_bytes": engine.runner.scratch.committed_bytes if engine.runner.scratch is not None else 0,
        "step_arena_high_water_bytes": engine.runner.scratch.high_water_bytes if engine.runner.scratch else 0,
        "memory_budget_bytes": engine.ledger.limit_bytes, "memory_reserved_bytes": engine.ledger.used_bytes,
        "memory_reserved_by_part": engine.ledger.by_owner(), "prefault_failures": engine.prefault_failures,
        "kv_commit_failures": getattr(engine.kv, "commit_failures", 0),
        "heap_trims": engine._heap.trims if engine._heap is not None else 0, "idle_heap_trims": engine._idle_heap.trims,
        "prefix_caching": engine.kv.prefix_caching, "prefix_cache_queries": engine.kv.prefix_stats.queries,
        "prefix_cache_query_tokens": engine.kv.prefix_stats.query_tokens,
        "prefix_cache_hit_tokens": engine.kv.prefix_stats.hit_tokens, "prefix_cached_bytes": engine.kv.cached_bytes,
        "preemptions_by_mode": dict(engine.scheduler.preemptions_by_mode),
        "admission_waits": dict(engine.scheduler.admission_waits),
        "swap": swap_stats(engine.swap),
        "speculative": engine.spec.stats_dict() if engine.spec is not None else {},
    }
