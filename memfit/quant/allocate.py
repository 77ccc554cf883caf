"""Per-layer bit widths under an average-bit budget, as a multiple-choice knapsack solved exactly (OR-Tools).

Every allocator reduces to the same problem: each free layer l picks one width b from BIT_CHOICES at a cost
c[l][b] (the damage the allocator expects from quantizing l to b bits), and the size-weighted average of the
widths, counting the fixed layers (patch embedding and head at 8 bits), must not exceed the budget:

    minimise  sum_l sum_b c[l][b] x[l,b]
    s.t.      sum_b x[l,b] = 1                                for each free layer l
              sum_l sum_b n_l b x[l,b] + sum_f n_f b_f <= B * (sum_l n_l + sum_f n_f)
              x binary

n_l is the layer's parameter count for weight bits; for activation bits, the elements per image its width
quantizes (its input, and for qkv also q/k/v and the softmax probabilities: act_groups.py).
The allocators differ only in c: lrp (contribution score x relative distortion), sensitivity (measured loss
of quantizing that layer alone), hessian (Hutchinson trace x squared distortion, HAWQ-V2), random (random
importance x distortion, seeded); uniform needs no solver.
"""
from __future__ import annotations

import math

from .errors import InfeasibleBudgetError, QuantError
from .quantizers import BIT_CHOICES


def feasible_range(sizes: dict[str, int], fixed: dict[str, tuple[int, int]],
                   choices: tuple[int, ...] = BIT_CHOICES) -> tuple[float, float]:
    """(smallest, largest) size-weighted average reachable: every free layer at min/max(choices)."""
    total = sum(sizes.values()) + sum(n for n, _ in fixed.values())
    fixed_bits = sum(n * b for n, b in fixed.values())
    lo = (fixed_bits + min(choices) * sum(sizes.values())) / total
    hi = (fixed_bits + max(choices) * sum(sizes.values())) / total
    return lo, hi


def average_bits(bits: dict[str, int], sizes: dict[str, int], fixed: dict[str, tuple[int, int]]) -> float:
    total = sum(sizes.values()) + sum(n for n, _ in fixed.values())
    return (sum(sizes[l] * bits[l] for l in sizes) + sum(n * b for n, b in fixed.values())) / total


def solve_knapsack(costs: dict[str, dict[int, float]], sizes: dict[str, int], avg_bits: float,
                   fixed: dict[str, tuple[int, int]] | None = None, what: str = "--avg-bits") -> dict[str, int]:
    """The cheapest choice of one width per free layer whose average (with `fixed` = name -> (size, bits))
    stays within `avg_bits`. Raises InfeasibleBudgetError naming the smallest feasible average."""
    from ortools.linear_solver import pywraplp

    fixed = fixed or {}
    choices = tuple(sorted(next(iter(costs.values())))) if costs else BIT_CHOICES
    bad = [(l, b, c) for l, per in costs.items() for b, c in per.items() if not math.isfinite(c)]
    if bad:  # a NaN or infinite cost makes the "cheapest" choice meaningless, and the solver would not say so
        l, b, c = bad[0]
        raise QuantError(f"the cost of {l} at {b} bits is {c}; allocation costs must be finite "
                         f"({len(bad)} are not): check the allocator's importance scores")
    if set(costs) != set(sizes) or any(sorted(per) != list(choices) for per in costs.values()):
        raise QuantError("every free layer needs a size and a cost at every width "
                         f"({', '.join(map(str, choices))})")
    lo, hi = feasible_range(sizes, fixed, choices)
    if avg_bits < lo - 1e-9:
        raise InfeasibleBudgetError(
            f"{what} {avg_bits:g} is infeasible: with the fixed layers at 8 bits the smallest average is {lo:.3f} "
            f"(every other layer at {min(choices)} bits); ask for at least {_round_up(lo):g}"
        )
    if avg_bits >= hi:  # everything at the widest width fits
        return {l: max(choices) for l in costs}
    solver = pywraplp.Solver.CreateSolver("SCIP")
    # Costs can span many orders of magnitude; scale so the largest is 1 (the solver's tolerances are absolute).
    top = max((abs(c) for per in costs.values() for c in per.values()), default=1.0) or 1.0
    x = {(l, b): solver.BoolVar(f"x[{l},{b}]") for l in costs for b in choices}
    for l in costs:
        solver.Add(sum(x[l, b] for b in choices) == 1)
    total = sum(sizes.values()) + sum(n for n, _ in fixed.values())
    budget = avg_bits * total - sum(n * b for n, b in fixed.values())
    solver.Add(sum(sizes[l] * b * x[l, b] for l in costs for b in choices) <= budget)
    solver.Minimize(sum(costs[l][b] / top * x[l, b] for l in costs for b in choices))
    status = solver.Solve()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise InfeasibleBudgetError(f"{what} {avg_bits:g}: the solver found no assignment (status {status}); "
                                    f"the smallest feasible average is {lo:.3f}")
    return {l: next(b for b in choices if x[l, b].solution_value() > 0.5) for l in costs}


def uniform_bits(sizes: dict[str, int], avg_bits: float, fixed: dict[str, tuple[int, int]] | None = None,
                 what: str = "--avg-bits") -> dict[str, int]:
    """The widest single width for every free layer that keeps the average within budget."""
    fixed = fixed or {}
    lo, _ = feasible_range(sizes, fixed)
    for b in sorted(BIT_CHOICES, reverse=True):
        bits = {l: b for l in sizes}
        if average_bits(bits, sizes, fixed) <= avg_bits + 1e-9:
            return bits
    raise InfeasibleBudgetError(
        f"{what} {avg_bits:g} is infeasible: with the fixed layers at 8 bits the smallest average is {lo:.3f} "
        f"(every other layer at {min(BIT_CHOICES)} bits); ask for at least {_round_up(lo):g}"
    )


def _round_up(value: float) -> float:
    """value rounded up to 2 decimals, so the suggestion is itself feasible."""
    import math

    return math.ceil(value * 100 - 1e-9) / 100
