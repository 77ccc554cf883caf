"""benchmarks/costmodel_vtile_rules.py: reading IREE's vector tile off a configuration dump, and fitting
vtiles.Rules to tiles (here, tiles that known rules generate) without the shipped values seeding the fit."""
import dataclasses

from benchmarks import costmodel_vtile_rules as R
from memfit.plan.cost import vtiles
from memfit.plan.cost.families import KernelSpec

# lines of real `--compile-to=executable-configurations` dumps (IREE 3.13, znver4), shortened
NCHW = """
  %5 = linalg.fill {lowering_config = #iree_cpu.lowering_config<vector_common_parallel = [1, 4, 1, 7]>} ins(%cst : f32) outs(%4 : tensor<1x48x28x28xf32>) -> tensor<1x48x28x28xf32>
  %7 = linalg.generic {indexing_maps = [], iterator_types = ["parallel", "parallel", "parallel", "parallel", "reduction", "reduction", "reduction"]} ins(%6, %3 : tensor<1x48x30x30xf32>, tensor<48x48x3x3xf32>) outs(%5 : tensor<1x48x28x28xf32>) attrs =  {lowering_config = #iree_cpu.lowering_config<distribution = [0, 4, 28, 28, 0, 0, 0], vector_common_parallel = [1, 4, 1, 7, 0, 0, 0], vector_reduction = [0, 0, 0, 0, 8, 1, 1]>} {
"""
# a batch matmul, then a softmax's reduction (one input) and its normalisation (two inputs, no reduction)
BMM_SOFTMAX = """
  %7 = linalg.batch_matmul {lowering_config = #iree_cpu.lowering_config<distribution = [0, 16, 64, 0], vector_common_parallel = [1, 5, 25, 0], vector_reduction = [0, 0, 0, 12]>} ins(%3, %4 : tensor<1x125x12xbf16>, tensor<1x12x125xbf16>) outs(%6 : tensor<1x125x125xf32>) -> tensor<1x125x125xf32>
  %6 = linalg.generic {iterator_types = ["parallel", "reduction"]} ins(%2 : tensor<125x125xf32>) outs(%5 : tensor<125xf32>) attrs =  {lowering_config = #iree_cpu.lowering_config<distribution = [5, 0], vector_common_parallel = [8, 0], vector_reduction = [0, 16]>} {
  %7 = linalg.generic {iterator_types = ["parallel", "parallel"]} ins(%2, %6 : tensor<125x125xf32>, tensor<125xf32>) outs(%3 : tensor<125x125xf32>) attrs =  {lowering_config = #iree_cpu.lowering_config<vector_common_parallel = [8, 0], vector_inner_parallel = [0, 16]>} {
"""
DEPTHWISE = """
  %7 = linalg.generic {iterator_types = ["parallel", "parallel", "parallel", "parallel", "reduction", "reduction"]} ins(%a, %b : tensor<1x9x9x64xf32>, tensor<3x3x64xf32>) outs(%5 : tensor<1x7x7x64xf32>) attrs =  {lowering_config = #iree_cpu.lowering_config<distribution = [1, 1, 7, 64, 0, 0], vector_common_parallel = [1, 1, 7, 16, 0, 0], vector_reduction = [0, 0, 0, 0, 1, 3]>} {
"""
ELEMENTWISE = """
  %6 = linalg.generic {iterator_types = ["parallel", "parallel"]} ins(%3, %4 : tensor<12544x3xf32>, tensor<3xf32>) outs(%5 : tensor<12544x3xf32>) attrs =  {lowering_config = #iree_cpu.lowering_config<distribution = [2048, 3], vector_common_parallel = [1, 16]>} {
"""


def test_iree_tile_reads_inner_rows_step():
    assert R.iree_tile(NCHW) == (7, 4, 8)            # OW innermost, F 4, C 8 (filter taps 1 x 1)
    assert R.iree_tile(BMM_SOFTMAX) == (25, 5, 12)   # the batch matmul, not the softmax's reduction
    assert R.iree_tile(DEPTHWISE) == (16, 7, 3)      # the step: the filter taps of a row, 1 x 3
    assert R.iree_tile(ELEMENTWISE) is None          # a 1x1 depthwise convolution lowers to this


def test_iree_tile_takes_the_op_of_most_loops():
    """A reduction with two inputs (a sum of exp(x - max)) ahead of the contraction is not taken for it."""
    two_input_sum = ('  %6 = linalg.generic {iterator_types = ["parallel", "reduction"]} ins(%2, %5 : tensor<125x125xf32>, '
                     'tensor<125xf32>) outs(%5 : tensor<125xf32>) attrs =  {lowering_config = #iree_cpu.lowering_config<'
                     'distribution = [5, 0], vector_common_parallel = [8, 0], vector_reduction = [0, 16]>} {\n')
    assert R.iree_tile(two_input_sum) == (8, 1, 16)
    assert R.iree_tile(two_input_sum + BMM_SOFTMAX) == (25, 5, 12)


def _items(rules: vtiles.Rules, specs: list[tuple[str, str, dict]]) -> list[dict]:
    out = []
    for family, dtype, params in specs:
        op = R.contraction(KernelSpec(family, dtype, params).mlir())
        out.append({"op": op, "dtype": dtype, "case": R.case(op), "iree": vtiles.tile(op, rules), "split": "train"})
    return out


MATMULS = [("matmul", dt, {"M": m, "K": k, "N": n}) for dt in ("f32", "i8")
           for m, k, n in ((24, 64, 64), (20, 48, 30), (12, 23, 96), (36, 40, 128), (30, 60, 45), (18, 32, 77))]


def test_fit_recovers_the_rules_that_made_the_tiles():
    truth = dataclasses.replace(vtiles.SHIPPED, mm_rows=4, mm_step=8)
    items = _items(truth, MATMULS)
    fitted, report = R.fit(items)
    assert (fitted.mm_rows, fitted.mm_step) == (4, 8)
    assert report["mm_rows"]["agreement_fitted"] == 1.0 and report["mm_rows"]["kernels"] == len(items)
    # the shipped cap of 8 rows gives 8, 5, 6, 6, 6, 6 rows to M = 24, 20, 12, 36, 30, 18, the truth 4 or 3
    assert report["mm_rows"]["agreement_shipped"] < 0.5
    assert R.agreement(items, fitted)["matmul"]["exact"] == 1.0
    assert R.agreement(items, vtiles.SHIPPED)["matmul"]["rows"] < 0.5


def test_fit_is_not_seeded_by_the_shipped_rules():
    """A parameter no kernel touches takes its smallest value, whatever the shipped one."""
    fitted, report = R.fit(_items(vtiles.SHIPPED, MATMULS))
    assert report["dw_taps"]["kernels"] == 0 and fitted.dw_taps == 1 != vtiles.SHIPPED.dw_taps
    # i8 N = 64, 30, 96, 128, 45, 77 tie every cap of 32..44; the smallest is kept
    assert fitted.mm_rows == 8 and report["mm_i8_inner"]["tied_best"] == [[32, 44]] and fitted.mm_i8_inner == 32


def test_ranges():
    assert R._ranges([7, 1, 2, 3]) == [[1, 3], [7, 7]] and R._ranges([]) == []


def test_main_reads_cached_dumps_and_reports(tmp_path, capsys):
    """End to end without IREE (--cached-only): matmuls whose dumps carry the tiles of rules with 6 rows on the
    training split and 4 on the others; the fit reads the training split alone (6), and the other splits'
    rows disagree with it."""
    import json

    from memfit.plan.cost import store
    from memfit.plan.cost.dataset import split_shape_keys

    specs = [KernelSpec("matmul", "f32", {"M": m, "K": 64, "N": 64}) for m in range(12, 240, 6)]
    train = set(split_shape_keys([s.shape_key() for s in specs])[0].tolist())
    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), specs)
    (tmp_path / "cfg").mkdir()
    for i, s in enumerate(specs):
        truth = dataclasses.replace(vtiles.SHIPPED, mm_rows=6 if i in train else 4)
        inner, rows, step = vtiles.tile(R.contraction(s.mlir()), truth)
        (tmp_path / "cfg" / f"{s.key()}.mlir").write_text(
            f"%7 = linalg.matmul {{lowering_config = #iree_cpu.lowering_config<vector_common_parallel = [{rows}, "
            f"{inner}, 0], vector_reduction = [0, 0, {step}]>}} ins(%3, %4 : tensor<a>, tensor<b>) outs(%6)\n")
    out = tmp_path / "r.json"
    assert R.main(["--db", str(db), "--configs", str(tmp_path / "cfg"), "--cached-only", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["fitted"]["mm_rows"] == 6 and not res["same_as_shipped"]
    assert res["parameters"]["mm_rows"]["kernels"] == len(train)   # fitted on the training kernels only
    assert res["parameters"]["mm_rows"]["agreement_fitted"] == 1.0
    assert not res["shipped_on_fit_split"]["mm_rows"]["optimal"]
    assert res["kernels"]["train"] == len(train) and 0 < len(train) < sum(res["kernels"].values()) == len(specs)
    assert res["agreement"]["train"]["fitted"]["all"]["exact"] == 1.0
    held = [res["agreement"][s]["fitted"]["all"]["rows"] for s in ("validation", "test") if res["kernels"][s]]
    assert held and max(held) == 0.0   # every M is a multiple of 6: 4 rows never agree with 6
    capsys.readouterr()
    assert R.main(["--db", str(db), "--configs", str(tmp_path / "cfg"), "--cached-only"]) == 0
    assert "mm_rows=8 is not optimal on train" in capsys.readouterr().out


def test_agreement_only_reports_each_rules_entry_by_case_and_family(tmp_path):
    """--agreement-only: each vtiles.RULES entry's exact-tile share against the cached dumps, per split, by case
    (with the NHWC + depthwise group) and by family. The fixture: 8 matmuls whose dumps carry the shipped tile
    but one (rows off by one), and a depthwise convolution of a 7x7 output whose dump carries the workgroup
    rules' tile (its width cut to rows of 1: 7 images x rows x F shares make 7 workgroups, under 8)."""
    import json

    from memfit.plan.cost import store
    from memfit.plan.cost.dataset import split_shape_keys

    mms = [KernelSpec("matmul", "f32", {"M": m, "K": 64, "N": 64}) for m in range(16, 80, 8)]
    dw = KernelSpec("conv", "f32", {"kind": "depthwise", "N": 1, "C": 64, "F": 64, "KH": 3, "stride": 1,
                                    "dilation": 1, "OH": 7})
    specs = [*mms, dw]
    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), specs)
    (tmp_path / "cfg").mkdir()
    for i, s in enumerate(mms):
        inner, rows, step = vtiles.tile(R.contraction(s.mlir()))
        rows += i == 0   # IREE's tile is not the model's
        (tmp_path / "cfg" / f"{s.key()}.mlir").write_text(
            f"%7 = linalg.matmul {{lowering_config = #iree_cpu.lowering_config<vector_common_parallel = [{rows}, "
            f"{inner}, 0], vector_reduction = [0, 0, {step}]>}} ins(%3, %4 : tensor<a>, tensor<b>) outs(%6)\n")
    inner, rows, step = vtiles.tile(R.contraction(dw.mlir()), vtiles.WORKGROUPS)
    assert (inner, rows, step) == (16, 1, 3) != vtiles.tile(R.contraction(dw.mlir()))
    (tmp_path / "cfg" / f"{dw.key()}.mlir").write_text(
        f"%7 = linalg.generic {{}} ins(%a, %b : tensor<x>, tensor<y>) outs(%5) attrs = {{lowering_config = "
        f"#iree_cpu.lowering_config<vector_common_parallel = [1, 1, {rows}, {inner}, 0, 0], "
        f"vector_reduction = [0, 0, 0, 0, 1, {step}]>}} {{\n")
    out = tmp_path / "a.json"
    assert R.main(["--db", str(db), "--configs", str(tmp_path / "cfg"), "--cached-only", "--agreement-only",
                   "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "fitted" not in res and res["fit_split"] is None
    agree = res["rules_agreement"]
    assert set(agree) == set(vtiles.RULES)
    names = ("train", "validation", "test")
    split_of = dict(zip(range(len(specs)), [None] * len(specs)))
    for name, idx in zip(names, split_shape_keys([s.shape_key() for s in specs])):
        for i in idx:
            split_of[int(i)] = name

    def total(rules: str, by: str, key: str, what: str) -> int:
        return sum(agree[rules][s][by].get(key, {}).get(what, 0) for s in names)

    assert total("shipped", "by_family", "matmul", "n") == 8 and total("shipped", "by_family", "conv", "n") == 1
    for rules in ("shipped", "workgroups"):   # the rules agree on matmuls: all but the one tile off
        assert total(rules, "by_family", "matmul", "exact_kernels") == 7
        assert total(rules, "by_case", "matmul", "exact_kernels") == 7
    assert total("shipped", "by_case", "depthwise", "exact_kernels") == 0
    assert total("workgroups", "by_case", "depthwise", "exact_kernels") == 1
    assert total("workgroups", "by_case", "conv_nhwc+depthwise", "exact_kernels") == 1
    assert total("shipped", "by_case", "conv_nhwc+depthwise", "n") == 1
    s = split_of[len(specs) - 1]       # the depthwise kernel's split: its shares
    assert agree["shipped"][s]["by_family"]["conv"] == {"n": 1, "inner": 1.0, "rows": 0.0, "step": 1.0,
                                                       "exact": 0.0, "exact_kernels": 0}
    assert agree["workgroups"][s]["by_family"]["conv"]["exact"] == 1.0
    assert total("workgroups", "by_family", "all", "exact_kernels") == 8
    assert total("shipped", "by_family", "all", "exact_kernels") == 7
    assert res["cases"] == "all"
    # --cases reads only the kernels of the cases named
    assert R.main(["--db", str(db), "--configs", str(tmp_path / "cfg"), "--cached-only", "--agreement-only",
                   "--cases", "depthwise", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    agree = res["rules_agreement"]
    assert res["cases"] == ["depthwise"] and res["dtypes"] == "all"
    assert total("shipped", "by_family", "all", "n") == 1
    assert total("workgroups", "by_family", "all", "exact_kernels") == 1
    assert R.main(["--db", str(db), "--configs", str(tmp_path / "cfg"), "--cached-only", "--agreement-only",
                   "--dtypes", "i8", "--out", str(out)]) == 0
    assert sum(json.loads(out.read_text())["kernels"].values()) == 0  # every kernel here is f32
    assert R.main(["--db", str(db), "--configs", str(tmp_path / "cfg"), "--cached-only", "--agreement-only",
                   "--dtypes", "f32", "--cases", "matmul", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    agree = res["rules_agreement"]
    assert (res["cases"], res["dtypes"]) == (["matmul"], ["f32"]) and sum(res["kernels"].values()) == 8
    assert total("shipped", "by_case", "matmul", "exact_kernels") == 7
    assert total("shipped", "by_case", "depthwise", "n") == 0
