"""The smallest memory budget that keeps a chosen share of speculative decoding's speed-up (`memfit fit`).

Speculation's memory grows with g (the target's lookahead KV, the verification logits and both distributions), and
its speed-up is predicted from a measured acceptance rate a and the measured costs of a draft pass (d) and of a
verification pass (v), both in plain decode steps:

    speedup(g) = (1 - a^(g+1)) / (1 - a) / (g d + v)        (speculative.best_gamma's rate; plain decoding = 1)

The bound is the predicted footprint (`fit.predict`) at the smallest g whose speed-up is at least `keep` x the best
g's: no smaller g keeps that share, and a larger one only costs more memory. Where no g beats plain decoding, the
budget is plain decoding's and the report says speculation does not pay.

`measure(...)` runs the pair and the target alone on a few fixed prompts to get a, d and v on this machine
(`SpecStats.token_acceptance`, `SpecStats.costs`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from memfit.llm.engine.speculative import expected_tokens_per_step

PROMPTS = ["def add(a, b):", "Once upon a time", "The capital of France is", "import numpy as np\n"]


def predicted_speedup(alpha: float, draft_cost: float, verify_cost: float, gamma: int) -> float:
    return expected_tokens_per_step(alpha, gamma) / (gamma * draft_cost + verify_cost) if gamma else 1.0


@dataclass
class SpecBound:
    alpha: float  # per-token acceptance used
    draft_cost: float  # a draft pass, in plain decode steps
    verify_cost: float  # a verification pass, in plain decode steps
    keep: float  # share of the best speed-up to keep
    best_gamma: int  # the fastest g in 1..max (0: none beats plain decoding)
    best_speedup: float
    gamma: int  # the smallest g keeping `keep` of the best speed-up (0: plain decoding)
    speedup: float
    budget_bytes: int  # the predicted footprint at that g: the smallest budget keeping the share

    def to_dict(self) -> dict:
        return asdict(self)


def smallest_budget(alpha: float, draft_cost: float, verify_cost: float, max_gamma: int,
                    total_at: Callable[[int], int], keep: float = 0.95) -> SpecBound:
    """total_at(g): the predicted footprint in bytes with g drafts (g = 0: without speculation)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"the share of the speed-up to keep must be in (0, 1], got {keep}")
    if not 0.0 <= alpha <= 1.0:  # a rate: 2 was taken and predicted impossible speed-ups
        raise ValueError(f"the acceptance rate (--acceptance) must be in [0, 1], got {alpha}")
    for flag, cost in (("--draft-cost", draft_cost), ("--verify-cost", verify_cost)):
        if not 0.0 < cost < math.inf:  # -1 divided by zero in predicted_speedup (a traceback)
            raise ValueError(f"{flag} is a pass's time in plain decode steps and must be positive, got {cost}")
    rates = {g: predicted_speedup(alpha, draft_cost, verify_cost, g) for g in range(0, max_gamma + 1)}
    best = max(rates, key=lambda g: (rates[g], -g))
    gamma = 0 if best == 0 else min(g for g in range(1, best + 1) if rates[g] >= keep * rates[best])
    return SpecBound(alpha, draft_cost, verify_cost, keep, best, rates[best], gamma, rates[gamma], total_at(gamma))


def measure(model: str, draft: str, gamma: int, dtype: str | None = None,
            max_tokens: int = 64) -> tuple[float, float, float]:
    """(per-token acceptance, draft pass cost, verification pass cost) of the pair on this machine, the costs in
    plain decode steps of the target alone: greedy, PROMPTS one at a time, after a warm-up of each engine."""
    import time

    from memfit.llm.engine.api import LLM
    from memfit.llm.engine.params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    plain = LLM(model, dtype=dtype, max_num_seqs=1)
    spec = LLM(model, dtype=dtype, max_num_seqs=1, speculative_model=draft, num_speculative_tokens=gamma)
    try:
        for llm in (plain, spec):
            llm.generate(PROMPTS[:1], sp)  # warm-up: first-call costs would inflate the pass times
        spec.engine.spec.stats = type(spec.engine.spec.stats)()
        t0, steps0 = time.perf_counter(), plain.engine.num_steps
        plain.generate(PROMPTS, sp)
        plain_step = (time.perf_counter() - t0) / (plain.engine.num_steps - steps0)
        spec.generate(PROMPTS, sp)
        st = spec.engine.spec.stats
        return (st.token_acceptance, *st.costs(plain_step))
    finally:
        plain.engine.close()
        spec.engine.close()
