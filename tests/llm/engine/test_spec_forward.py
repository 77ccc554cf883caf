"""One pass over chunks (engine/spec_forward.py): verification's g+1-token chunks through the C++ decode stack
(kernels/stack.py, `run(..., counts)`) give the logits of the chunked-prefill path and of one-token decode steps,
within float32 tolerance, on both caches, and write the same K/V."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.engine.api import LLM
from memfit.llm.engine.spec_forward import forward
from memfit.llm.kernels import build

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [8, 9, 10, 11], [200, 260, 31, 64, 12, 13, 90, 91, 92, 93, 14]]
DRAFTS = [[44, 45, 46], [100], [7, 8, 9, 10]]  # ids < 300: the tiny test models' vocabulary too  # chunks of 4, 2 and 5 tokens: ragged, as acceptance leaves them


def _engine(kv_cache: str, threads: int, dtype: str = "float32", model: str = "memfit-tiny",
            cpu_linear: str = "auto") -> LLM:
    if build.unavailable_reason(getattr(torch, dtype)) is not None:
        pytest.skip(f"memfit's CPU kernels are unavailable here for {dtype}")
    llm = LLM(model, dtype=dtype, kv_cache=kv_cache, max_num_seqs=8, threads=threads, cpu_linear=cpu_linear)
    assert llm.engine.runner.stack is not None  # the path under test
    return llm


def _prefill(runner, seq_ids: list[int]) -> None:
    """Each prompt's K/V into the cache (all but its last token, which the verification chunk starts with)."""
    for sid, prompt in zip(seq_ids, PROMPTS):
        assert runner.kv.try_allocate(sid, len(prompt) + 8)
        forward(runner, [(sid, 0, prompt[:-1])], all_rows=False)


def _chunks(seq_ids: list[int]) -> list[tuple[int, int, list[int]]]:
    return [(sid, len(p) - 1, [p[-1]] + d) for sid, p, d in zip(seq_ids, PROMPTS, DRAFTS)]


def _verify(runner, seq_ids: list[int], use_stack: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The verification logits (sum(g+1), V), and the logits of one more token after each chunk, which read back
    every K/V row the cache holds (through the chunked path, the same reader for both)."""
    stack = runner.stack
    runner.stack = stack if use_stack else None
    try:
        logits = forward(runner, _chunks(seq_ids), all_rows=True)
        runner.stack = None
        after = forward(runner, [(sid, len(p) + len(d), [6]) for sid, p, d in zip(seq_ids, PROMPTS, DRAFTS)],
                        all_rows=True)
    finally:
        runner.stack = stack
    return logits, after


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
@pytest.mark.parametrize("threads", [1, 2])  # 2: rows of one sequence attend on different threads
@pytest.mark.parametrize("cpu_linear", ["auto", "memfit"])  # the blocked matmuls (here), the row-major ones
def test_verification_through_the_stack_equals_the_chunked_path(kv_cache: str, threads: int, cpu_linear: str) -> None:
    llm = _engine(kv_cache, threads, cpu_linear=cpu_linear)
    runner = llm.engine.runner
    _prefill(runner, [1, 2, 3])
    _prefill(runner, [11, 12, 13])
    fast, fast_after = _verify(runner, [1, 2, 3], use_stack=True)
    slow, slow_after = _verify(runner, [11, 12, 13], use_stack=False)
    assert fast.shape == (sum(len(d) + 1 for d in DRAFTS), runner.model.config.vocab_size)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_after, slow_after, rtol=1e-4, atol=1e-4)  # the same K/V was written
    # The greedy picks agree wherever the chunked path's top two logits are not within float error of each other.
    top2 = slow.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(fast.argmax(1)[clear], slow.argmax(1)[clear]) and clear.sum() >= len(clear) - 1
    llm.engine.close()


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verification_rows_equal_one_token_decode_steps(kv_cache: str, dtype: str) -> None:
    """Row j of a sequence's chunk sees exactly the tokens up to its own position (causal within the chunk): its
    logits are those of decoding the chunk's tokens one at a time. The same kernels run both and each row's hidden
    state does not depend on the rows beside it (bit for bit); with blocked matmuls throughout (bf16 here) so are
    the logits, so greedy speculation then picks what plain decoding picks, near-ties included."""
    llm = _engine(kv_cache, 2, dtype)
    runner = llm.engine.runner
    _prefill(runner, [1, 2, 3])
    _prefill(runner, [11, 12, 13])
    fast, _ = _verify(runner, [1, 2, 3], use_stack=True)
    rows = []
    for j in range(max(len(d) for d in DRAFTS) + 1):
        chunks = [(sid, len(p) - 1 + j, ([p[-1]] + d)[j : j + 1]) for sid, p, d in zip([11, 12, 13], PROMPTS, DRAFTS)
                  if j <= len(d)]
        rows.append(forward(runner, chunks, all_rows=True))  # one-token decode rows: the plain decode step
    by_seq: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    for j, out in enumerate(rows):
        live = [b for b, d in enumerate(DRAFTS) if j <= len(d)]
        for r, b in enumerate(live):
            by_seq[b].append(out[r])
    step_by_step = torch.stack([row for seq_rows in by_seq for row in seq_rows])
    if dtype == "bfloat16" and llm.engine.backends.cpu_linear == "blocked":
        assert torch.equal(fast, step_by_step)  # blocked matmuls (lm_head too): each row's sums alone
    else:  # float32's tied lm_head is row-major, which sums rows 3+ in another order (as a batch-4 decode step does)
        torch.testing.assert_close(fast, step_by_step, rtol=1e-5, atol=2e-5)
    llm.engine.close()


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_verification_under_a_sliding_window_equals_the_chunked_path(tmp_path, kv_cache: str) -> None:
    """Mistral with an 8-token window (contexts of 7-16 here): each verification row sees the last 8 positions up to
    its own, as the chunked path's mask gives."""
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="mistral", hidden_size=128, sliding_window=8)  # head_dim 32
    llm = _engine(kv_cache, 2, model=str(path))
    runner = llm.engine.runner
    _prefill(runner, [1, 2, 3])
    _prefill(runner, [11, 12, 13])
    fast, fast_after = _verify(runner, [1, 2, 3], use_stack=True)
    slow, slow_after = _verify(runner, [11, 12, 13], use_stack=False)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_after, slow_after, rtol=1e-4, atol=1e-4)
    llm.engine.close()


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_verification_split_over_several_stack_calls_changes_nothing(kv_cache: str) -> None:
    """More rows than one stack call takes (`max_chunk_rows`) run in calls of whole sequences: same logits, bit
    for bit, and the same K/V."""
    llm = _engine(kv_cache, 1)
    runner = llm.engine.runner
    _prefill(runner, [1, 2, 3])
    _prefill(runner, [11, 12, 13])
    whole, whole_after = _verify(runner, [1, 2, 3], use_stack=True)
    runner.stack.max_chunk_rows = 6  # chunks of 4, 2 and 5 rows: calls of [4, 2] and [5]
    split, split_after = _verify(runner, [11, 12, 13], use_stack=True)
    assert torch.equal(whole, split) and torch.equal(whole_after, split_after)
    llm.engine.close()


def test_groups_of_whole_sequences_within_the_limit() -> None:
    from memfit.llm.engine.spec_forward import _groups

    assert _groups([4, 2, 5], 6) == [(0, 2), (2, 3)]
    assert _groups([3, 3, 3], 64) == [(0, 3)]
    assert _groups([7, 1], 6) == [(0, 1), (1, 2)]  # a chunk above the limit runs alone
