"""engine/admission.py: what a request must satisfy before it is queued."""
from __future__ import annotations

import pytest

from memfit.llm.engine.admission import check_fits_budget, check_priority, check_prompt, max_new_tokens
from memfit.llm.engine.errors import RequestError
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, Tier


class PagedKV:
    """bytes_needed as a paged cache's: whole pages of `page_tokens` tokens."""

    def __init__(self, page_tokens: int, page_bytes: int) -> None:
        self.page_tokens, self.page_bytes = page_tokens, page_bytes

    def bytes_needed(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens) * self.page_bytes


@pytest.mark.parametrize("limit", [1, 4096, 4097, 40_000, 10**9])
@pytest.mark.parametrize("prompt_len", [1, 17, 100])
def test_max_new_tokens_is_the_largest_that_fits(limit, prompt_len):
    kv, max_len = PagedKV(16, 4096), 160
    got = max_new_tokens(kv, limit, max_len, prompt_len)
    fitting = [n for n in range(1, max_len - prompt_len + 1) if kv.bytes_needed(prompt_len + n) <= limit]
    assert got == (max(fitting) if fitting else 1)  # at least one token is always asked for


def test_prompts_outside_the_vocabulary_or_context_are_refused():
    check_prompt([0, 5, 9], vocab_size=10, max_model_len=8)
    for bad in ([], [10], [-1], [True], [1.0]):
        with pytest.raises(RequestError):
            check_prompt(bad, vocab_size=10, max_model_len=8)
    with pytest.raises(RequestError, match="shorten the prompt"):
        check_prompt(list(range(8)), vocab_size=10, max_model_len=8)


def test_a_sequence_larger_than_the_kv_share_names_what_holds_the_rest():
    ledger = MemoryBudget(1 << 20, Tier.DEVICE, name="memory_budget")
    ledger.reserve(600_000, owner="weights")
    kv_budget = MemoryBudget(8192, Tier.DEVICE, name="kv_budget", parent=ledger)
    check_fits_budget(PagedKV(16, 4096), kv_budget, ledger, 32)
    with pytest.raises(MemoryBudgetExceeded, match="weights"):
        check_fits_budget(PagedKV(16, 4096), kv_budget, ledger, 33)


def test_priority_must_be_an_integer():
    check_priority(-3)
    for bad in (1.5, "1", True, None):
        with pytest.raises(RequestError):
            check_priority(bad)
