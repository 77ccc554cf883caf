"""Multi-turn sessions: a session's next turn takes over the KV its previous turn left, wherever it is.

A finished turn's KV stays in the cache (scheduler: retained), or, once evicted, in the swap tiers as a kept
copy (kv/swap_reuse.py: cross-turn reuse). The new prompt usually repeats that turn's tokens and adds the next
message, but re-rendering the chat template may tokenize the previous answer differently, so the KV is reused
up to the longest common prefix and only the rest is prefilled (or, for a kept host copy, the prefix is
swapped in when the scheduler admits the turn instead of prefilled).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memfit.llm.engine.request import Sequence
    from memfit.llm.engine.scheduler import Scheduler
    from memfit.llm.engine.spec_decode import SpecDecoder
    from memfit.llm.kv.base import KVCacheManager
    from memfit.llm.kv.swap import SwapSpace

__all__ = ["adopt_session_kv", "common_prefix"]


def adopt_session_kv(seq: Sequence, scheduler: Scheduler, kv: KVCacheManager, swap: SwapSpace | None,
                     spec: SpecDecoder | None) -> None:
    """Give the new turn `seq` of `seq.session_id` the previous turn's KV for their common prefix: `seq` takes
    its sequence id, and its first tokens count as computed (or, held on the host, `seq.swapped`)."""
    old = scheduler.take_retained(seq.session_id)  # type: ignore[arg-type]
    on_host = old is None  # the previous turn's KV was evicted to the swap tiers (cross-turn reuse)
    old = old or scheduler.take_swapped_session(seq.session_id)  # type: ignore[arg-type]
    if old is None:
        return
    held = swap.valid_tokens(old.seq_id) if on_host else old.num_computed  # type: ignore[union-attr]
    n = common_prefix(old.all_token_ids[:held], seq.prompt_token_ids)
    if spec is not None:
        spec.adopt(old.seq_id, seq, n)  # the draft's KV of the previous turn, up to the same prefix
    if on_host:  # swapped in when the scheduler admits it, instead of prefilled
        n = swap.adopt(old.seq_id, n)  # type: ignore[union-attr]
        seq.swapped = n > 0
    elif n == 0:
        kv.free(old.seq_id)
    else:
        kv.truncate(old.seq_id, n)
    if swap is not None:
        swap.truncate(old.seq_id, n)  # a kept host copy: positions from n on are rewritten
    if n == 0:
        return
    seq.seq_id = old.seq_id  # the KV manager knows the cache by this id
    seq.num_computed = seq.num_cached_prompt = n


def common_prefix(cached: list[int], prompt: list[int]) -> int:
    """Tokens a new turn's prompt shares with the cached ones; the last prompt token is always fed (it yields the
    logits), so at most len(prompt) - 1."""
    n, limit = 0, min(len(cached), len(prompt) - 1)
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return n
