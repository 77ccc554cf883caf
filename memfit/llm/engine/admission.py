"""What a request must satisfy before the engine queues it: a prompt of valid token ids that leaves room to
generate, one sequence's KV within the KV cache's share, an integer priority. Each failure is a RequestError or a
MemoryBudgetExceeded whose message says what to change; nothing is queued or allocated first."""
from __future__ import annotations

from memfit.llm.engine.errors import EMPTY_MESSAGES, MAX_USER_CHARS, RequestError
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, format_bytes


def check_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """Refuse an empty prompt, ids outside the vocabulary, or a prompt that leaves no token to generate."""
    if not prompt_token_ids:
        raise RequestError("the prompt is empty: it must contain at least one token")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in prompt_token_ids):
        raise RequestError(f"prompt_token_ids must be integers in [0, {vocab_size})")
    if len(prompt_token_ids) >= max_model_len:
        raise RequestError(
            f"the prompt has {len(prompt_token_ids)} tokens but the model's context is {max_model_len} "
            "tokens, and at least one token must be left to generate; shorten the prompt"
        )


def check_fits_budget(kv: object, kv_budget: MemoryBudget, ledger: MemoryBudget, total_tokens: int) -> None:
    """Refuse a sequence of `total_tokens` whose KV alone exceeds the KV cache's share, naming what holds the rest."""
    need = kv.bytes_needed(total_tokens)
    if need > kv_budget.limit_bytes:
        held = ", ".join(f"{k} {format_bytes(v)}" for k, v in ledger.by_owner().items() if k != "kv_budget")
        raise MemoryBudgetExceeded(
            f"one sequence of {total_tokens} tokens needs {format_bytes(need)} of KV cache but the KV cache's share is "
            f"{format_bytes(kv_budget.limit_bytes)} (memory budget {format_bytes(ledger.limit_bytes)}, "
            f"of which {held}); raise --memory-budget (or --kv-budget) or lower max_tokens"
        )


def max_new_tokens(kv: object, kv_limit_bytes: int, max_model_len: int, prompt_len: int) -> int:
    """What the context leaves after the prompt, shortened until one sequence's KV fits `kv_limit_bytes`."""
    hi = max(1, max_model_len - prompt_len)
    if kv.bytes_needed(prompt_len + hi) <= kv_limit_bytes:
        return hi
    lo = 1  # binary search for the largest max_tokens whose KV still fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv.bytes_needed(prompt_len + mid) <= kv_limit_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_priority(priority: object) -> None:
    """A priority is an integer (negative values are valid: more urgent); anything else is a RequestError."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise RequestError(f"priority must be an integer (lower = more urgent, negative allowed), got {priority!r}")


def check_user(user: object) -> None:
    """A user is None or a string of at most MAX_USER_CHARS characters; anything else is a RequestError."""
    if user is None:
        return
    if not isinstance(user, str):
        raise RequestError(f"user must be a string (or None), got {type(user).__name__} {user!r:.60}")
    if len(user) > MAX_USER_CHARS:
        raise RequestError(f"user is {len(user)} characters long; at most {MAX_USER_CHARS} are allowed")


def check_messages(messages: object) -> None:
    """Refuse an empty message list (a template would render a prompt of its special tokens alone)."""
    if isinstance(messages, list) and not messages:
        raise RequestError(EMPTY_MESSAGES)
