"""Two labellings of the same kernels compared: how far labels taken at different times (or under different
load) disagree, overall, by family and dtype, by latency band, and the kernels that moved most.

    python -m benchmarks.costmodel_label_drift OLD.db NEW.db [--out x.json]

Both files hold labels of the same kind from one host (`memfit costmodel label`); only kernels labelled in both
are compared. "new" is the reference: APE is |old - new| / new, the error a perfect model of the old labels would
show against the new ones. Each label's repetitions (real and CPU time) are shown for the kernels that moved most,
so a disturbed labelling shows itself (real time far above CPU time, a wide spread).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict

from memfit.plan.cost import store

BANDS_US = ((0, 10), (10, 100), (100, 1000), (1000, 3000), (3000, math.inf))


def _labels(path: str) -> dict[str, dict]:
    return {r["key"]: r for r in store.labelled(store.connect(path))}


def _summary(pairs: list[tuple[float, float]]) -> dict:
    ape = [abs(o - n) / n for o, n in pairs]
    logs = [math.log(o / n) for o, n in pairs]
    return {"n": len(pairs), "mape": statistics.fmean(ape), "median_ape": statistics.median(ape),
            "median_log_old_over_new": statistics.median(logs), "over_30pct": sum(a > 0.3 for a in ape)}


def compare(old_db: str, new_db: str, top: int = 15) -> dict:
    old, new = _labels(old_db), _labels(new_db)
    keys = sorted(set(old) & set(new))
    if not keys:
        raise SystemExit("no kernel is labelled in both files")
    pair = {k: (old[k]["latency_us"], new[k]["latency_us"]) for k in keys}
    groups: dict[str, list] = defaultdict(list)
    bands: dict[str, list] = defaultdict(list)
    for k in keys:
        groups[f"{new[k]['family']}/{new[k]['dtype']}"].append(pair[k])
        lo, hi = next(b for b in BANDS_US if b[0] <= pair[k][1] < b[1])
        bands[f"{lo}-{hi}"].append(pair[k])
    moved = sorted(keys, key=lambda k: abs(pair[k][0] - pair[k][1]) / pair[k][1], reverse=True)[:top]
    return {"benchmark": "costmodel_label_drift", "old": old_db, "new": new_db,
            "meta_old": {k: store.meta(store.connect(old_db)).get(k) for k in ("host_cpu", "iree_version", "label_kind")},
            "meta_new": {k: store.meta(store.connect(new_db)).get(k) for k in ("host_cpu", "iree_version", "label_kind")},
            "all": _summary(list(pair.values())),
            "by_family_dtype": {g: _summary(v) for g, v in sorted(groups.items())},
            "by_new_latency_us": {b: _summary(v) for b, v in bands.items()},
            "moved_most": [{"key": k, "family": new[k]["family"], "dtype": new[k]["dtype"], "params": new[k]["params"],
                            "old_us": pair[k][0], "new_us": pair[k][1],
                            "old_real_reps": old[k]["reps"], "old_cpu_reps": old[k].get("cpu_reps"),
                            "new_real_reps": new[k]["reps"], "new_cpu_reps": new[k].get("cpu_reps")} for k in moved]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--top", type=int, default=15, help="kernels that moved most, listed with their repetitions")
    p.add_argument("--out")
    args = p.parse_args(argv)
    out = compare(args.old, args.new, args.top)
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    a = out["all"]
    print(f"{a['n']} kernels: MAPE {a['mape']:.3f}, median APE {a['median_ape']:.3f}, {a['over_30pct']} over 30%",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
