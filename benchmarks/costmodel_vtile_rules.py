"""Where vtiles.py's rules come from: the vector tiles IREE's llvm-cpu lowering chose for the data set's
contraction kernels, the rules' parameters fitted to one split's tiles, and their agreement on the others.

    python -m benchmarks.costmodel_vtile_rules --db costmodel.db --configs vtile_configs [--fit train] \
        [--check validation,test] [--agreement-only] [--cases conv_nchw_1x1s] [--dtypes f32] [--json] \
        [--out benchmarks/results/costmodel_vtile_rules.json]

1. Dump: every kernel with a contraction (vtiles' dominant one) of the splits read is compiled with
   `iree-compile --compile-to=executable-configurations` (the labels' target flags, so this host's CPU) into
   --configs (one file a kernel, kept: a rerun reads them instead of compiling; needs IREE the first time).
2. Read: the contraction's `lowering_config` gives IREE's vector tile: inner = the tile of its last parallel
   loop, rows = the product of its other parallel tiles, step = the product of its reduction tiles.
3. Fit: on the --fit split only (the shape split of `dataset.split_shape_keys`, seed 0, as the model's),
   each parameter of `vtiles.Rules` (PARAMS: its candidate caps or thresholds, the cases and the tile entry it
   sets) in turn takes every candidate value, the others held, and keeps the value of highest agreement
   (ties: the smallest); started from every parameter's smallest value, not the shipped rules; three
   passes. Reported: each candidate's agreement, the fitted and the shipped value; and, the others held at
   the shipped rules, whether each shipped value is among the best on the --fit split (`shipped_on_fit_split`).
4. Check: on each split, the share of kernels of each case (matmul, batch matmul, NHWC, NCHW, depthwise
   convolution; 1x1 of stride 1 and of stride 2 apart) whose inner / rows / step the fitted rules and the
   shipped rules (vtiles.SHIPPED) give exactly.
5. Rules agreement (`rules_agreement`; alone with --agreement-only, which fits nothing): for each entry of
   vtiles.RULES (the rules a model is trained with, `benchmarks.costmodel --vtile-rules NAME`) and each split
   read, how often its tile is IREE's exactly (and its inner / rows / step), by case (with the group
   conv_nhwc+depthwise, the cases the workgroup cut changes) and by the data set's family.

Prints one JSON object (--json; a short table otherwise); progress to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.common import emit, header

SPLITS = ("train", "validation", "test")
_CFG = re.compile(r"lowering_config\s*=\s*#iree_cpu\.lowering_config<([^>]*)>")
_LIST = re.compile(r"(\w+)\s*=\s*\[([^\]]*)\]")


MM = ("matmul", "batch_matmul", "conv_nhwc_1x1", "conv_nchw_1x1")  # the cases lowered as a matmul
CAPS = tuple(range(1, 65))
# Each parameter of vtiles.Rules: the values tried, the cases it touches and the tile entry it sets (0 inner,
# 1 rows, 2 step; None: all three), and the dtypes it applies to (None: every dtype). Two parameters joined by
# "+" are fitted together over pairs of values (f32's "small tile" needs both: one alone changes nothing).
PARAMS: dict[str, tuple[tuple, tuple[str, ...], int | None, tuple[str, ...] | None]] = {
    "mm_rows": (CAPS, MM, 1, None),
    "mm_step": (CAPS, MM, 2, None),
    "mm_i8_inner": (CAPS, MM, 0, ("i8",)),
    "mm_wide": (CAPS, MM, 0, ("f32", "bf16")),
    "mm_bf16_small": (tuple(range(1, 258)), MM, 0, ("bf16",)),
    "mm_f32_short_k+mm_f32_small": (tuple((a, b) for a in range(1, 34) for b in range(1, 258)), MM, 0, ("f32",)),
    "mm_f32_full_n": (tuple(range(16, 257)), MM, 0, ("f32",)),
    "nhwc_inner": (CAPS, ("conv_nhwc",), 0, None),
    "nhwc_rows": (CAPS, ("conv_nhwc", "conv_nhwc_1x1s"), 1, None),
    "nhwc_step": (CAPS, ("conv_nhwc",), 2, None),
    "nhwc_1x1s_inner": (CAPS, ("conv_nhwc_1x1s",), 0, ("f32", "bf16")),
    "nhwc_1x1s_inner_i8": (CAPS, ("conv_nhwc_1x1s",), 0, ("i8",)),
    "conv_1x1s_step": (CAPS, ("conv_nhwc_1x1s", "conv_nchw_1x1s"), 2, None),
    "nchw_inner": (CAPS, ("conv_nchw",), 0, None),
    "nchw_rows": (CAPS, ("conv_nchw",), 1, None),
    "nchw_groups": (tuple(range(1, 33)), ("conv_nchw",), 1, None),
    "nchw_step": (CAPS, ("conv_nchw",), 2, None),
    "nchw_1x1s_inner": (CAPS, ("conv_nchw_1x1s",), 0, None),
    "nchw_1x1s_rows": (CAPS, ("conv_nchw_1x1s",), 1, None),
    "dw_inner": (CAPS, ("depthwise",), 0, None),
    "dw_rows": (CAPS, ("depthwise",), 1, None),
    "dw_taps": (tuple(range(1, 8)), ("depthwise",), 2, None),
}


def iree_tile(config_text: str) -> tuple[int, int, int] | None:
    """(inner, rows, step) of the contraction in an `--compile-to=executable-configurations` dump: among the
    ops with two or more inputs whose lowering config has a vector_reduction (a matmul, a convolution; a
    softmax's reductions have one input, a bias none), the one of most loops (the first of them). None when
    there is none (a 1x1 depthwise convolution is lowered as an element-wise op)."""
    best: list[tuple[int, list[int], list[int]]] = []
    for line in config_text.splitlines():
        m = _CFG.search(line)
        if not m or "vector_reduction" not in m.group(1):
            continue
        ins = re.search(r"\bins\(([^:)]*)", line)
        if not ins or ins.group(1).count("%") < 2:
            continue
        lists = {k: [int(x) for x in v.split(",") if x.strip()] for k, v in _LIST.findall(m.group(1))}
        red = lists["vector_reduction"]
        par = lists.get("vector_common_parallel", []) + [0] * len(red)
        if not best or len(red) > best[0][0]:
            best = [(len(red), par[:len(red)], red)]
    if not best:
        return None
    _, par, red = best[0]
    par_tiles = [p for p, r in zip(par, red) if r == 0 and p > 0]  # a loop of tile 0 is not tiled
    if not par_tiles:
        return None
    return par_tiles[-1], math.prod(par_tiles[:-1]), math.prod(r for r in red if r > 0)


def case(op) -> str:
    """The kind of a contraction as the rules tell them apart: matmul, batch_matmul, conv_nhwc / conv_nchw
    (with _1x1 for a 1x1 filter of stride 1, _1x1s for one of stride 2), depthwise."""
    from memfit.plan.cost.gemm import kind

    k = kind(op)
    if k in ("conv_nhwc", "conv_nchw"):
        kh, kw = (op.ins[1].shape[:2] if k == "conv_nhwc" else op.ins[1].shape[2:])
        if kh == kw == 1:
            return k + ("_1x1" if op.strides == 1 else "_1x1s")
    return k


def contraction(mlir: str):
    """vtiles' dominant contraction of a kernel (the one of most FLOPs), or None."""
    from memfit.plan.cost.gemm import gemm_view
    from memfit.plan.cost.ops import linalg_ops
    from memfit.plan.cost.parse import pick_function

    ops = [o for o in linalg_ops(pick_function(mlir)) if gemm_view(o)[0]]
    return max(ops, key=lambda o: o.flops()) if ops else None


def dump(mlir: str, path: Path, timeout: float = 120, compile: bool = True, target_cpu: str = "host") -> str | None:
    """The executable-configurations dump of a kernel (cached at path) for `target_cpu` (an LLVM CPU name;
    "host", the labels' flag, is this machine's); None when the compiler fails (or, without `compile`, when
    it is not cached)."""
    if path.exists():
        text = path.read_text()
        return text if text else None
    if not compile:
        return None
    from memfit.plan.cost.iree import TARGET_FLAGS, tool

    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.with_suffix(".in.mlir")
    src.write_text(mlir)
    try:
        flags = [f if not f.startswith("--iree-llvmcpu-target-cpu=") else f"--iree-llvmcpu-target-cpu={target_cpu}"
                 for f in TARGET_FLAGS]
        proc = subprocess.run([tool("iree-compile"), str(src), *flags,
                               "--compile-to=executable-configurations", "-o", str(path)],
                              capture_output=True, text=True, timeout=timeout)
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    src.unlink(missing_ok=True)
    if not ok:
        path.write_text("")  # remembered as failed
        return None
    return path.read_text()


def kernels(db: str, splits: set[str], seed: int = 0) -> list[dict]:
    """The contraction kernels of a data set (labelled or not) with their split, case and op."""
    import sqlite3

    from memfit.plan.cost.dataset import split_shape_keys

    con = sqlite3.connect(db)
    rows = con.execute("SELECT key, family, dtype, shape_key, mlir FROM kernels WHERE family != 'tuned_matmul' "
                       "ORDER BY rowid").fetchall()
    tr, va, te = split_shape_keys([r[3] for r in rows], seed)
    split = {}
    for name, idx in zip(SPLITS, (tr, va, te)):
        for i in idx:
            split[int(i)] = name
    out = []
    for i, (key, family, dtype, _, mlir) in enumerate(rows):
        if split[i] not in splits:
            continue
        op = contraction(mlir)
        if op is not None:
            out.append({"key": key, "family": family, "dtype": dtype, "split": split[i], "mlir": mlir, "op": op,
                        "case": case(op)})
    return out


def agreement(items: list[dict], rules, by: str = "case", groups: dict[str, tuple[str, ...]] | None = None) \
        -> dict[str, dict]:
    """Per value of each kernel's `by` entry ("case", or "family": the data set's family) and "all": kernels, and
    the share whose inner / rows / step the rules give exactly; with `groups`, also each group of values (name:
    the values it joins) that has kernels."""
    from memfit.plan.cost import vtiles

    out: dict[str, dict] = {}
    for it in items:
        got = vtiles.tile(it["op"], rules)
        names = [it[by], "all", *(g for g, members in (groups or {}).items() if it[by] in members)]
        for c in names:
            d = out.setdefault(c, {"n": 0, "inner": 0, "rows": 0, "step": 0, "exact": 0})
            d["n"] += 1
            for j, name in enumerate(("inner", "rows", "step")):
                d[name] += got[j] == it["iree"][j]
            d["exact"] += got == it["iree"]
    for d in out.values():
        d["exact_kernels"] = d["exact"]
        for name in ("inner", "rows", "step", "exact"):
            d[name] = round(d[name] / d["n"], 4)
    return dict(sorted(out.items()))


# the cases vtiles.WORKGROUPS' workgroup cut changes (NHWC convolutions but 1x1 ones, and depthwise ones)
GROUPS = {"conv_nhwc+depthwise": ("conv_nhwc", "depthwise")}


def rules_agreement(items: list[dict], splits: list[str]) -> dict[str, dict]:
    """For each entry of vtiles.RULES (the rules a model can be trained with, `--vtile-rules`) and each split:
    how often its tile is IREE's exactly (and each entry of it), by case (with GROUPS) and by family."""
    from memfit.plan.cost import vtiles

    return {name: {s: {"by_case": agreement([it for it in items if it["split"] == s], rules, "case", GROUPS),
                       "by_family": agreement([it for it in items if it["split"] == s], rules, "family")}
                   for s in splits}
            for name, rules in vtiles.RULES.items()}


def _score(items: list[dict], rules, which: int | None) -> float:
    from memfit.plan.cost import vtiles

    hit = 0
    for it in items:
        got = vtiles.tile(it["op"], rules)
        hit += (got == it["iree"]) if which is None else (got[which] == it["iree"][which])
    return hit / len(items) if items else 0.0



def _scores(items: list[dict], rules, p: str) -> tuple[list[str], list[dict], dict[tuple, float], float]:
    """Parameter (or pair) `p` of PARAMS with the others held at `rules`: its names, the kernels it decides, each
    candidate value's agreement on them, and the best agreement."""
    values, cases, which, dtypes = PARAMS[p]
    names = p.split("+")
    sub = [it for it in items if it["case"] in cases and (dtypes is None or it["dtype"] in dtypes)]
    tuples = [v if isinstance(v, tuple) else (v,) for v in values]
    scores = {v: _score(sub, dataclasses.replace(rules, **dict(zip(names, v))), which) for v in tuples}
    return names, sub, scores, max(scores.values())

def fit(items: list[dict], passes: int = 3) -> tuple[object, dict]:
    """vtiles.Rules fitted to `items` (kernels with IREE's tile): coordinate-wise, each parameter (or pair) of
    PARAMS over its values on the kernels it touches, scored on the tile entry it sets, the best value kept
    (ties: the smallest); started from every parameter's smallest value (not the shipped rules), `passes`
    rounds. The report gives each value's agreement (for a pair, each member's value at the other's best)."""
    from memfit.plan.cost import vtiles

    start = {}
    for p, spec in PARAMS.items():
        start.update(zip(p.split("+"), spec[0][0] if "+" in p else (spec[0][0],)))
    rules = vtiles.Rules(**start)
    report: dict[str, dict] = {}
    for _ in range(passes):
        for p in PARAMS:
            names, sub, scores, best = _scores(items, rules, p)
            chosen = min(v for v, sc in scores.items() if sc == best)
            rules = dataclasses.replace(rules, **dict(zip(names, chosen)))
            shipped = tuple(getattr(vtiles.SHIPPED, n) for n in names)
            entry = {"kernels": len(sub), "fitted": _one(chosen), "shipped": _one(shipped),
                     "agreement_fitted": round(best, 4), "agreement_shipped": round(scores.get(shipped, float("nan")), 4)}
            if len(names) == 1:
                entry["tied_best"] = _ranges([v[0] for v, sc in scores.items() if sc == best])
                entry["agreement"] = {str(v[0]): round(sc, 4) for v, sc in scores.items()}
            else:
                for j, n in enumerate(names):
                    marg: dict[int, float] = {}
                    for v, sc in scores.items():
                        marg[v[j]] = max(marg.get(v[j], 0.0), sc)
                    entry[f"tied_best_{n}"] = _ranges([x for x, sc in marg.items() if sc == best])
                    entry[f"agreement_{n}"] = {str(x): round(sc, 4) for x, sc in sorted(marg.items())}
            report[p] = entry
    return rules, report


def around(items: list[dict], rules) -> dict[str, dict]:
    """For each parameter (or pair) of PARAMS, the others held at `rules`: its agreement at `rules`' value,
    the best agreement any value reaches, and the values that reach it. `rules` is optimal on `items`
    parameter by parameter when every one of its values is among them."""
    out = {}
    for p in PARAMS:
        names, sub, scores, best = _scores(items, rules, p)
        own = tuple(getattr(rules, n) for n in names)
        out[p] = {"kernels": len(sub), "value": _one(own), "agreement": round(scores[own], 4),
                  "best": round(best, 4), "optimal": scores[own] == best,
                  "best_values": ([_one(v) for v, sc in scores.items() if sc == best][:8] if len(names) > 1 else
                                  _ranges([v[0] for v, sc in scores.items() if sc == best]))}
    return out


def _one(v: tuple) -> int | list[int]:
    return v[0] if len(v) == 1 else list(v)


def _ranges(values: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--configs", required=True, help="folder of the dumps (written on the first run)")
    ap.add_argument("--fit", default="train", choices=SPLITS)
    ap.add_argument("--check", default="validation,test")
    ap.add_argument("--seed", type=int, default=0, help="the shape split's seed")
    ap.add_argument("--cached-only", action="store_true", help="compile nothing: read the dumps already there")
    ap.add_argument("--target-cpu", default="host",
                    help="LLVM CPU the configurations are for (default host, as the labels; e.g. sapphirerapids for "
                         "the Intel host the shipped model's labels came from: a compiler decision, so any machine "
                         "can dump it)")
    ap.add_argument("--agreement-only", action="store_true",
                    help="fit nothing: only each vtiles.RULES entry's exact-tile agreement by case and family")
    ap.add_argument("--cases", default="",
                    help="read only kernels of these cases (comma-separated, as case() names them: e.g. "
                         "conv_nchw_1x1s, a few minutes to compile where the whole set takes an hour); default all")
    ap.add_argument("--dtypes", default="", help="read only kernels of these dtypes (comma-separated); default all")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from memfit.plan.cost import iree, vtiles

    check = [s for s in args.check.split(",") if s]
    cases = {c for c in args.cases.split(",") if c}
    dtypes = {d for d in args.dtypes.split(",") if d}
    items = [it for it in kernels(args.db, {args.fit, *check}, args.seed)
             if (not cases or it["case"] in cases) and (not dtypes or it["dtype"] in dtypes)]
    failed = 0
    for i, it in enumerate(items):
        text = dump(it["mlir"], Path(args.configs) / f"{it['key']}.mlir", compile=not args.cached_only,
                    target_cpu=args.target_cpu)
        it["iree"] = iree_tile(text) if text else None
        failed += it["iree"] is None
        if (i + 1) % 50 == 0 or i + 1 == len(items):
            print(f"{i + 1}/{len(items)} configurations read ({failed} without a contraction tile)",
                  file=sys.stderr, flush=True)
    good = [it for it in items if it["iree"] is not None]
    splits = list(dict.fromkeys([args.fit, *check]))
    result = {"benchmark": "costmodel_vtile_rules", **header(1, args.seed),
              "iree_version": iree.version(), "host_cpu": iree.host_cpu(), "target_cpu": args.target_cpu,
              "fit_split": None if args.agreement_only else args.fit, "cases": sorted(cases) or "all",
              "dtypes": sorted(dtypes) or "all",
              "kernels": {s: sum(it["split"] == s for it in items) for s in SPLITS},
              "without_tile": {s: sum(it["split"] == s and it["iree"] is None for it in items) for s in SPLITS},
              "rules_agreement": rules_agreement(good, splits)}
    if not args.agreement_only:
        fitted, report = fit([it for it in good if it["split"] == args.fit])
        result.update({
            "fitted": dataclasses.asdict(fitted), "shipped": dataclasses.asdict(vtiles.SHIPPED),
            "same_as_shipped": fitted == vtiles.SHIPPED, "parameters": report,
            "shipped_on_fit_split": around([it for it in good if it["split"] == args.fit], vtiles.SHIPPED),
            "agreement": {s: {"fitted": agreement([it for it in good if it["split"] == s], fitted),
                              "shipped": agreement([it for it in good if it["split"] == s], vtiles.SHIPPED)}
                          for s in splits}})
    if args.json or args.out:
        emit(result, args.out)
        return 0
    if not args.agreement_only:
        print(f"fitted on {args.fit}: {'the shipped rules' if result['same_as_shipped'] else result['fitted']}")
        for p, d in result["shipped_on_fit_split"].items():
            if not d["optimal"]:
                print(f"shipped {p}={d['value']} is not optimal on {args.fit}: {d['agreement']} against "
                      f"{d['best']} at {d['best_values']} ({d['kernels']} kernels)")
        for s, both in result["agreement"].items():
            for c, d in both["fitted"].items():
                sh = both["shipped"][c]
                print(f"{s:10s} {c:14s} n={d['n']:4d} fitted {d['inner']:.3f}/{d['rows']:.3f}/{d['step']:.3f}"
                      f"  shipped {sh['inner']:.3f}/{sh['rows']:.3f}/{sh['step']:.3f}")
    names = list(result["rules_agreement"])
    print("exact tile " + " / ".join(names))
    for s in splits:
        for by in ("by_case", "by_family"):
            for c in result["rules_agreement"][names[0]][s][by]:
                print(f"{s:10s} {c:20s} n={result['rules_agreement'][names[0]][s][by][c]['n']:4d} " +
                      " / ".join(f"{result['rules_agreement'][n][s][by][c]['exact']:.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
