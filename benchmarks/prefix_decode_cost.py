"""What prefix caching (on by default) costs a decode step that shares nothing: the same engine with and without it.

0.1B random-initialised Llama (bf16, benchmarks/decode_setup.py), 8 sequences of distinct 512-token prompts, 96
greedy tokens each, 1 thread; the two configurations alternate `--reps` times in this process. Per run: process
CPU seconds and wall seconds per decode step (the steps after every prompt is prefilled). CPU time is the
headline: wall time moves with whatever else the machine runs. Medians.

    OMP_NUM_THREADS=1 python -m benchmarks.prefix_decode_cost --reps 3 --out benchmarks/results/prefix_decode_cost.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, header, pin_threads


def decode_cost(path: Path, prefix_caching: bool, seed: int) -> dict:
    import torch

    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(path), max_num_seqs=8, max_model_len=1024,
                                    enable_prefix_caching=prefix_caching))
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        engine.add_request(prompt_token_ids=torch.randint(5, 30000, (512,), generator=g).tolist(),
                           params=SamplingParams(max_tokens=96, ignore_eos=True, temperature=0))
    while engine.stats()["num_waiting"] or any(not s.output_token_ids for s in engine.scheduler.running):
        engine.step()  # prefill every prompt first
    steps0, cpu, wall = engine.num_steps, time.process_time(), time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    steps = engine.num_steps - steps0
    out = {"prefix_caching": prefix_caching, "decode_steps": steps,
           "cpu_s_per_step": (time.process_time() - cpu) / steps, "wall_s_per_step": (time.perf_counter() - wall) / steps}
    engine.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pin_threads(1)
    from benchmarks.decode_setup import make_model_dir

    runs = []
    with tempfile.TemporaryDirectory(prefix="memfit-prefix-cost-") as tmp:
        path = make_model_dir("0.1b", "bfloat16", Path(tmp))
        for rep in range(a.reps):
            for on in (True, False):
                runs.append(decode_cost(path, on, rep))
                print(f"[prefix_decode_cost] rep {rep} prefix caching {on}: "
                      f"{runs[-1]['cpu_s_per_step'] * 1e3:.2f} ms CPU per step", file=sys.stderr, flush=True)

    def median(on: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["prefix_caching"] == on)

    summary = {("on" if on else "off"): {k: median(on, k) for k in ("cpu_s_per_step", "wall_s_per_step")}
               for on in (True, False)}
    emit({"benchmark": "prefix_decode_cost", **header(1), "runs": runs, "median": summary,
          "cpu_ratio_on_over_off": summary["on"]["cpu_s_per_step"] / summary["off"]["cpu_s_per_step"]}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
