import itertools

import pytest

from memfit.quant.allocate import average_bits, feasible_range, solve_knapsack, uniform_bits
from memfit.quant.errors import InfeasibleBudgetError, QuantError
from memfit.quant.quantizers import BIT_CHOICES

SIZES = {"a": 1000, "b": 4000, "c": 2000, "d": 500}
FIXED = {"patch": (300, 8), "head": (200, 8)}


def _costs(importance):
    return {l: {b: importance[l] * 4.0 ** -b for b in BIT_CHOICES} for l in importance}


def brute_force(costs, sizes, avg, fixed):
    best = None
    for combo in itertools.product(BIT_CHOICES, repeat=len(costs)):
        bits = dict(zip(costs, combo))
        if average_bits(bits, sizes, fixed) <= avg + 1e-9:
            cost = sum(costs[l][bits[l]] for l in costs)
            if best is None or cost < best[0] - 1e-15:
                best = (cost, bits)
    return best


@pytest.mark.parametrize("avg", [2.7, 3.0, 3.5, 4.0, 5.0, 6.5])
def test_knapsack_matches_brute_force(avg):
    costs = _costs({"a": 5.0, "b": 0.3, "c": 2.0, "d": 9.0})
    bits = solve_knapsack(costs, SIZES, avg, FIXED)
    assert average_bits(bits, SIZES, FIXED) <= avg + 1e-9
    best_cost, _ = brute_force(costs, SIZES, avg, FIXED)
    assert sum(costs[l][bits[l]] for l in costs) == pytest.approx(best_cost, rel=1e-6)


def test_important_layers_get_more_bits():
    bits = solve_knapsack(_costs({"a": 100.0, "b": 1.0, "c": 1.0, "d": 100.0}), SIZES, 4.0, FIXED)
    assert bits["a"] > bits["b"] and bits["d"] > bits["c"]


def test_infeasible_budget_names_the_smallest_feasible():
    lo, hi = feasible_range(SIZES, FIXED)
    # fixed 500 params at 8 bits, 7,500 at 2 bits: (4000 + 15000) / 8000
    assert lo == pytest.approx((500 * 8 + 7500 * 2) / 8000) and hi == 8
    with pytest.raises(InfeasibleBudgetError, match=f"smallest average is {lo:.3f}"):
        solve_knapsack(_costs({l: 1.0 for l in SIZES}), SIZES, 2.0, FIXED)
    with pytest.raises(InfeasibleBudgetError, match="at least 2.38"):
        uniform_bits(SIZES, 2.0, FIXED)
    suggested = solve_knapsack(_costs({l: 1.0 for l in SIZES}), SIZES, 2.38, FIXED)  # the suggestion works
    assert average_bits(suggested, SIZES, FIXED) <= 2.38


def test_uniform_takes_the_widest_width_that_fits():
    bits = uniform_bits(SIZES, 4.5, FIXED)
    assert set(bits.values()) == {4}  # 6 bits for all would average 6.25
    assert uniform_bits(SIZES, 8, FIXED) == {l: 8 for l in SIZES}


@pytest.mark.parametrize("avg", [2.5, 3.0, 3.98, 4.6])
def test_bits_are_monotonic_in_importance_at_equal_size(avg):
    """With equal sizes and the same distortion curve, a more important layer never gets fewer bits than a less
    important one (swapping their widths would cost less at the same size), and the average stays within the
    budget, spending all of it but less than one step of the smallest layer."""
    import random

    rng = random.Random(int(avg * 100))
    names = [f"l{i}" for i in range(8)]
    sizes = {n: 1000 for n in names}
    importance = {n: rng.lognormvariate(0, 2) for n in names}
    bits = solve_knapsack(_costs(importance), sizes, avg, FIXED)
    ranked = sorted(names, key=importance.get)
    assert [bits[n] for n in ranked] == sorted(bits[n] for n in ranked)
    spent = average_bits(bits, sizes, FIXED)
    total = sum(sizes.values()) + sum(n for n, _ in FIXED.values())
    assert spent <= avg + 1e-9 and avg - spent < 2 * 1000 / total  # no single one-step upgrade still fits


def test_bad_costs_are_refused():
    costs = _costs({"a": 5.0, "b": 0.3, "c": 2.0, "d": 9.0})
    costs["b"][3] = float("nan")
    with pytest.raises(QuantError, match="cost of b at 3 bits is nan"):
        solve_knapsack(costs, SIZES, 4.0, FIXED)
    costs = _costs({"a": 5.0, "b": 0.3, "c": 2.0})
    with pytest.raises(QuantError, match="every free layer needs a size and a cost"):
        solve_knapsack(costs, SIZES, 4.0, FIXED)
