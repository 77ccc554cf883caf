"""benchmarks/kv_attention's intervals over the timed rounds: what tells "paged faster" from noise."""
import random

from benchmarks.kv_attention import ratio_intervals, ratios


def _rounds(paged_scale: float, n: int = 15, noise: float = 0.03, seed: int = 0) -> dict[str, list[float]]:
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"virtual": [], "paged": []}
    for _ in range(n):
        load = rng.uniform(1.0, 1.3)  # a round's machine state, shared by its variants (they ran side by side)
        out["virtual"].append(1e-3 * load * rng.uniform(1 - noise, 1 + noise))
        out["paged"].append(1e-3 * paged_scale * load * rng.uniform(1 - noise, 1 + noise))
    return out


def _ratio(med: dict[str, float]) -> dict[str, float]:
    return {"r": med["paged"] / med["virtual"]}


def test_paged_clearly_faster_lies_below_one():
    lo, hi = ratio_intervals(_rounds(0.85), _ratio)["r"]
    assert lo < hi < 1.0


def test_parity_holds_one():
    for seed in range(5):
        lo, hi = ratio_intervals(_rounds(1.0, seed=seed), _ratio, seed=seed)["r"]
        assert lo < 1.0 < hi, (seed, lo, hi)


def test_decode_cells_intervals_follow_ratios():
    """decode_cell's use: `ratios` over the kernels' eight variants (four layouts, in and out of order)."""
    scales = {"virtual": 1.0, "virtual_head_major": 0.95, "paged": 1.1, "paged_128": 1.05}
    rounds = {name + suffix: _rounds(s, seed=i)["paged"] for i, (name, s) in enumerate(scales.items())
              for suffix in ("", "_out_of_order")}
    ci = ratio_intervals(rounds, lambda med: ratios({"kernel": {f"{n}_ms": t for n, t in med.items()}}))
    assert set(ci) == {"kernel_in_order", "kernel_out_of_order", "kernel_in_order_default_layouts",
                       "kernel_out_of_order_default_layouts"}
    # best paged (paged_128, x1.05) over best virtual (head-major, x0.95): about 1.1, clearly above 1
    assert 1.0 < ci["kernel_in_order"][0] < ci["kernel_in_order"][1]
    assert 1.0 < ci["kernel_in_order_default_layouts"][0]  # paged 16 (x1.1) over the per-layer virtual (x1.0)


def test_decode_cell_gives_each_variant_its_rows_back_in_data_order():
    """Each variant's batch goes through its cache in its own (shuffled) order; the cell puts the rows back before
    it compares them. Out of order the batch is a permutation, so a wrong un-permutation makes outputs differ."""
    import torch

    from benchmarks.kv_attention import decode_cell

    order = list(range(3))
    random.Random(2 + 3 + 40).shuffle(order)  # the cell's out-of-order batch (seed + batch + ctx): not the identity
    assert order != [0, 1, 2]
    torch.manual_seed(0)
    row = decode_cell(batch=3, ctx=40, reps=1, ops=None, seed=2)
    assert row["torch"]["close_output"] is True
    assert {"virtual_ms", "virtual_out_of_order_ms", "virtual_gather_ms", "paged_ms",
            "paged_out_of_order_ms"} <= set(row["torch"])
    assert "virtual_runs_out_of_order_ms" not in row["torch"]  # CUDA only
