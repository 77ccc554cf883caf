"""Speculative decoding (memfit-tiny-draft proposing for memfit-tiny) against plain decoding, batch 1 and 4.

    python -m benchmarks.speculative --threads 1 --out benchmarks/results/speculative.json

For each batch size, the same prompts are generated greedily by a plain engine and by speculative ones (one per
num_speculative_tokens g), alternated round by round (`interleave`): throughput (generated tokens / s, median
of the rounds), the draft's acceptance rate, tokens a sequence gains per target pass, and whether the tokens
match. The bundled 4M-parameter target is far from bandwidth-bound on a CPU, so the draft's passes cost about
as much as the target's: this measures the machinery (acceptance, tokens per step), not a speed-up that needs a
larger target (issue 16, item 5).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.common import emit, header, interleave, pin_threads

PROMPTS = ["def add(a, b):", "Once upon a time", "The capital of France is", "import numpy as np\n",
           "for i in range(10):", "Hello, my name is", "class Stack:", "The weather today"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gammas", default="1,2,4", help="num_speculative_tokens values, one speculative engine each")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    common = dict(dtype=args.dtype, threads=args.threads)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = PROMPTS[:batch]
        plain = LLM("memfit-tiny", max_num_seqs=batch, **common)
        gammas = [int(g) for g in args.gammas.split(",")]
        # one engine per fixed g, and one choosing g adaptively (up to the largest) from acceptance and cost
        variants = [(f"g{g}", g, False) for g in gammas] + [(f"adaptive{max(gammas)}", max(gammas), True)]
        specs = {name: (g, adaptive, LLM("memfit-tiny", max_num_seqs=batch, speculative_model="memfit-tiny-draft",
                                         num_speculative_tokens=g, speculative_adaptive=adaptive, **common))
                 for name, g, adaptive in variants}
        outs: dict[str, list] = {}

        def runner(name: str, llm):
            def run() -> None:
                outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
            return run

        fns = {"plain": runner("plain", plain), **{name: runner(name, v[2]) for name, v in specs.items()}}
        times = interleave(fns, reps=args.reps)
        tokens = batch * args.max_tokens
        plain_tok_s = tokens / statistics.median(times["plain"])
        for name, (g, adaptive, llm) in specs.items():
            st = llm.engine.stats()["speculative"]
            row = {
                "batch": batch, "gamma": g, "adaptive": adaptive, "tokens": tokens, "plain_tok_s": plain_tok_s,
                "speculative_tok_s": tokens / statistics.median(times[name]),
                "acceptance_rate": st["acceptance_rate"], "tokens_per_target_step": st["tokens_per_seq_step"],
                "plain_share": st["spec_chose_plain"] / max(1, st["spec_chose_plain"] + st["spec_seq_steps"]),
                "identical_tokens": outs["plain"] == outs[name],
            }
            row["speedup"] = row["speculative_tok_s"] / plain_tok_s
            print(f"batch {batch}: {row}", file=sys.stderr)
            rows.append(row)
    result = {"benchmark": "speculative", **header(args.threads, args.seed), "dtype": args.dtype,
              "target": "memfit-tiny", "draft": "memfit-tiny-draft", "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
