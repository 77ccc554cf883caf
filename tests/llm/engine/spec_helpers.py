"""Shared by the chain and tree speculative-decoding tests: the prompts, the bundled draft, token ids of outputs, and
greedy outputs that may differ from plain decoding only at near-ties of the target's top two logits."""
from __future__ import annotations

PROMPTS = ["def add(a, b):", "Once upon a time", "The capital of France is", "import numpy as np\n",
           "for i in range(10):", "Hello, my name is"]
DRAFT = "memfit-tiny-draft"
BF16_GAP = 0.07  # about bf16's spacing at the logits' magnitude


def near_tie_divergences(got, want, gap: float = BF16_GAP) -> int:
    """How many of the sequences in `got` diverge from plain decoding's `want` (both RequestOutput lists, `want`
    generated with logprobs >= 2); a divergence anywhere but at a near-tie (top-two logprob gap < `gap`) fails."""
    diverged = 0
    for g, w in zip(got, want):
        a, b = g.outputs[0].token_ids, w.outputs[0].token_ids
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            continue
        diverged += 1
        top = sorted(w.outputs[0].logprobs[i].top.values(), reverse=True)
        assert top[0] - top[1] < gap, f"divergence at token {i} without a near-tie: {top}"
    return diverged


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def run_noting_shrinks_before_preemption(eng) -> tuple[dict, int | None]:
    """Step `eng` until its requests finish: (finished outputs by request id, how many times speculation had shrunk
    when the first preemption happened; None if none happened)."""
    shrunk_before_preempt = None
    outs = {}
    while eng.has_unfinished_requests():
        shrunk = eng.stats()["speculative"]["spec_shrunk"]
        for out in eng.step():
            if out.finished:
                outs[out.request_id] = out
        if shrunk_before_preempt is None and eng.scheduler.num_preemptions:
            shrunk_before_preempt = shrunk
    return outs, shrunk_before_preempt


def run_until_finished(eng, request_id: str) -> list[int]:
    """Step `eng` until nothing is left; the token ids `request_id` generated."""
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished and out.request_id == request_id:
                done = out
    return done.outputs[0].token_ids
