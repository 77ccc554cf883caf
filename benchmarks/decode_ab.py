"""Decode must not regress: memfit's decode step time in this tree against another source tree of memfit (e.g. the
commit before a change, exported with `git archive REV | tar -x -C DIR`), alternating run by run.

Each run is a fresh process on one tree: the 0.1b random-initialised Llama in bf16 (benchmarks.decode_setup), one
thread, `batch` prompts of 32 random tokens, the median CPU time of 24 decode steps after 4 warm-up steps
(benchmarks.prefill.decode_steps's workload). Runs alternate between the trees, --rounds each; the medians over
rounds are reported. CPU time, so other jobs on a shared machine slow neither side's figure much.

    OMP_NUM_THREADS=1 python -m benchmarks.decode_ab --before /tmp/memfit-before --out benchmarks/results/decode_ab.json

Prints one JSON object; --out also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import emit, header

HERE = Path(__file__).resolve().parents[1]

# Run inside the tree under test (its own memfit first on the import path): one engine, `batch` sequences, decode steps timed.
_CHILD = r"""
import statistics, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from benchmarks.decode_setup import make_model_dir
from memfit.llm.engine import EngineConfig, LLMEngine
from memfit.llm.engine.params import SamplingParams
batch, steps = int(sys.argv[1]), 24
with tempfile.TemporaryDirectory() as tmp:
    path = make_model_dir("0.1b", "bfloat16", Path(tmp))
    eng = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", kv_budget="2GiB", max_num_seqs=batch, max_model_len=512))
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        eng.add_request(prompt_token_ids=torch.randint(0, 32000, (32,), generator=g).tolist(),
                        params=SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
    for _ in range(4):
        eng.step()
    times = []
    while eng.has_unfinished_requests():
        t = time.process_time()
        eng.step()
        times.append((time.process_time() - t) * 1e3)
    eng.close()
print("RESULT", statistics.median(times))
"""


def run_tree(tree: Path, batch: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tree))
    res = subprocess.run([sys.executable, "-c", _CHILD, str(batch)], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=900)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"decode run in {tree} failed: {res.stderr.strip().splitlines()[-3:]}")
    return float(line.split()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="another memfit source tree (the baseline)")
    ap.add_argument("--now", default=str(HERE), help="the tree under test (default: this one)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    trees = {"now": Path(args.now).resolve(), "before": Path(args.before).resolve()}
    rows = []
    load_before = os.getloadavg()
    for b in args.batches:
        ms: dict[str, list[float]] = {k: [] for k in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                ms[name].append(run_tree(tree, b))
        row = {"batch": b, **{f"{k}_ms": round(statistics.median(v), 2) for k, v in ms.items()},
               **{f"{k}_runs_ms": [round(x, 2) for x in v] for k, v in ms.items()}}
        row["before_over_now"] = round(row["before_ms"] / row["now_ms"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    result = {"benchmark": "decode_ab", **header(1), "timer": "process CPU time, median of steps, median of rounds",
              "trees": {k: str(v) for k, v in trees.items()}, "load_avg_before": [round(x, 2) for x in load_before],
              "load_avg_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
