"""Speculative decoding (memfit-tiny-draft proposing for memfit-tiny) against plain decoding, and against Hugging
Face assisted generation on the same pair.

    python -m benchmarks.speculative --threads 1 --reps 5 --max-tokens 128 --batches 1,4,10,16 --requests-per-slot 4 \
        --hf-peer --out benchmarks/results/speculative.json

For each batch size (max_num_seqs; with `--requests-per-slot k`, k x batch requests queued at once, so slots
freed by sequences that finish early are refilled), the same prompts are generated greedily by a plain engine and by speculative ones (one per
num_speculative_tokens g, and one choosing g adaptively), alternated round by round (`interleave`) and timed by
the process's CPU time (`--clock cpu`, the default: a shared machine's load then slows no variant more than
another) or wall time: throughput (generated tokens / s, median of the rounds), the per-token acceptance, tokens
a sequence gains per target pass, the measured cost of a draft pass and of a verification pass in plain decode
steps, and whether the tokens match plain decoding's. The pass costs come two ways: `verify_cost` /
`draft_cost` time the passes alone (`pass_costs`: `spec_forward.forward` over the batch at a 64-token context,
median of 100, against the target's one-token step), `engine_*` are the engine's own moving averages (wall time,
against its plain steps), which adaptive g uses.

`--hf-peer` adds, at batch 1, transformers' `generate()` on the same two checkpoints (loaded from the same
safetensors, same dtype, one thread), plain and with `assistant_model=` (assisted generation, its default
draft-length schedule), in the same rounds, with its tokens checked against memfit's.

`--chunk-loop` adds a twin of every speculative engine whose verify passes attend sequence by sequence
(MEMFIT_CHUNK_LOOP=1) instead of one call per run of cache slots, in the same rounds.

The bundled 4M-parameter target is small: on a CPU a draft pass (0.9M parameters) costs about a third of a
target step, and acceptance is ~0.35-0.5 per token, so speculation can at best break even here; the benchmark
measures the machinery (verification at about one decode step, acceptance, tokens per step), not a speed-up that
needs a larger target and a draft that agrees with it (issue 16, item 5).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from unittest import mock

from benchmarks.common import emit, header, interleave, pin_threads

PROMPTS = ["def add(a, b):", "Once upon a time", "The capital of France is", "import numpy as np\n",
           "for i in range(10):", "Hello, my name is", "class Stack:", "The weather today",
           "# Sort a list\n", "She opened the door and", "def main():\n", "My favourite food is",
           "while True:", "In the morning, the", "x = [1, 2, 3]\n", "The little dog"]
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def hf_variants(dtype: str, prompts: list[list[int]], max_tokens: int, outs: dict[str, list],
                model: str = "memfit-tiny", draft_model: str = "memfit-tiny-draft") -> dict:
    """transformers' plain and assisted greedy generation on the same pair, the prompts one after another
    (batch 1: assisted generation takes one sequence), as callables."""
    import torch
    import transformers

    from memfit.llm.models.loader import resolve_model_path

    def load(name: str):
        path = str(resolve_model_path(name))
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    target, draft = load(model), load(draft_model)
    kw = dict(do_sample=False, max_new_tokens=max_tokens, pad_token_id=0, eos_token_id=None)  # ignore eos

    def runner(name: str, **extra):
        def run() -> None:
            with torch.no_grad():
                outs[name] = [target.generate(torch.tensor([ids]), **kw, **extra)[0, len(ids):].tolist()
                              for ids in prompts]
        return run

    return {"hf_plain": runner("hf_plain"), "hf_assisted": runner("hf_assisted", assistant_model=draft)}


def pass_costs(llm, batch: int, gamma: int, clock, reps: int = 100, context: int = 64) -> dict:
    """Median seconds of one pass of `spec_forward.forward` (what each speculative step runs) over `batch` dummy
    sequences of `context` tokens: the target's plain decode step (one token each), its verification (g+1 each)
    and a draft pass (one token each); the two costs are in plain steps. The sequences are freed after."""
    from memfit.llm.engine.spec_forward import forward

    spec = llm.engine.spec
    ids = list(range(10**6, 10**6 + batch))
    out = {}
    for who, runner in (("target", spec.target), ("draft", spec.draft)):
        for sid in ids:
            assert runner.kv.try_allocate(sid, context + gamma + 1)
            forward(runner, [(sid, 0, [3] * context)], all_rows=False)
        for n in ((1, gamma + 1) if who == "target" else (1,)):
            ts = []
            for _ in range(reps):
                t0 = clock()
                forward(runner, [(sid, context, [5] * n) for sid in ids], all_rows=True)
                ts.append(clock() - t0)
                for sid in ids:
                    runner.kv.truncate(sid, context)
            out[f"{who}_{n}"] = statistics.median(ts)
        for sid in ids:
            runner.kv.free(sid)
    return {"plain_step_ms": 1e3 * out["target_1"], "verify_pass_ms": 1e3 * out[f"target_{gamma + 1}"],
            "draft_pass_ms": 1e3 * out["draft_1"], "verify_cost": out[f"target_{gamma + 1}"] / out["target_1"],
            "draft_cost": out["draft_1"] / out["target_1"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="memfit-tiny", help="target: a bundled model's name or a directory")
    ap.add_argument("--draft", default="memfit-tiny-draft", help="draft: a bundled model's name or a directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gammas", default="1,2,4", help="num_speculative_tokens values, one speculative engine each")
    ap.add_argument("--trees", default="", help="token trees WxD (e.g. 2x3,4x3; 3x3a: with speculative_adaptive, "
                    "trees or chains step by step), one tree-speculation engine each (speculative_tree)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (the default); above 0, sampled requests seeded from --seed (trees then verify by "
                         "SpecInfer's multi-candidate rule, chains by Leviathan's; identical_tokens is then moot)")
    ap.add_argument("--batches", default="1,4", help="comma-separated max_num_seqs values")
    ap.add_argument("--requests-per-slot", type=int, default=1,
                    help="requests per batch slot, queued at once: above 1, a finished sequence's slot is refilled "
                         "(continuous batching), so a batch's slowest sequence does not set its time alone")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time or wall time")
    ap.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-g engine")
    ap.add_argument("--chunk-loop", action="store_true",
                    help="also run each speculative engine as a twin (<name>-loop) whose verify passes attend "
                         "sequence by sequence (MEMFIT_CHUNK_LOOP=1), side by side with the batched ones")
    ap.add_argument("--hf-peer", action="store_true", help="also time transformers' assisted generation (batch 1)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True,
                        seed=args.seed if args.temperature > 0 else None)
    # the engine's and server's step, as the committed results ran (LLM's own CPU default is 2048)
    common = dict(dtype=args.dtype, threads=args.threads, max_num_batched_tokens=512)
    rows, peer = [], None
    for batch in (int(b) for b in args.batches.split(",")):
        if batch < 1 or args.requests_per_slot < 1:
            ap.error("--batches and --requests-per-slot must be positive")
        n = batch * args.requests_per_slot
        prompts = (PROMPTS * -(-n // len(PROMPTS)))[:n]
        plain = LLM(args.model, max_num_seqs=batch, **common)
        gammas = [int(g) for g in args.gammas.split(",")]
        # one engine per fixed g, and one choosing g adaptively (up to the largest) from acceptance and cost
        variants = [(f"g{g}", g, False, None) for g in gammas]
        if not args.no_adaptive:
            variants.append((f"adaptive{max(gammas)}", max(gammas), True, None))
        trees = [(t.removesuffix("a"), t.endswith("a")) for t in args.trees.split(",") if t]  # 3x3a: adaptive
        variants += [(f"tree{t}{'a' if a else ''}", int(t.split("x")[1]), a, tuple(int(x) for x in t.split("x")))
                     for t, a in trees]
        if args.chunk_loop:
            variants += [(f"{name}-loop", g, a, tree) for name, g, a, tree in variants]
        specs = {name: (g, adaptive, LLM(args.model, max_num_seqs=batch, speculative_model=args.draft,
                                         speculative_tree=tree, speculative_adaptive=adaptive, **common,
                                         **({} if tree else {"num_speculative_tokens": g})))
                 for name, g, adaptive, tree in variants}
        outs: dict[str, list] = {}

        def runner(name: str, llm):
            def run() -> None:
                # a -loop twin's steps read MEMFIT_CHUNK_LOOP=1 as they plan their attention: only its run loops
                with mock.patch.dict(os.environ, {"MEMFIT_CHUNK_LOOP": "1" if name.endswith("-loop") else "0"}):
                    outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
            return run

        fns = {"plain": runner("plain", plain), **{name: runner(name, v[2]) for name, v in specs.items()}}
        if args.hf_peer and batch == 1:
            fns.update(hf_variants(args.dtype, [plain.tokenizer.encode(p) for p in prompts], args.max_tokens, outs,
                                   args.model, args.draft))
        times = interleave(fns, reps=args.reps, clock=CLOCKS[args.clock])
        tokens = len(prompts) * args.max_tokens
        plain_tok_s = tokens / statistics.median(times["plain"])
        for name, (g, adaptive, llm) in specs.items():
            st = llm.engine.stats()["speculative"]
            row = {
                "variant": name, "chunk_loop": name.endswith("-loop"), "batch": batch, "gamma": g, "adaptive": adaptive,
                "tree": st["tree"], "tokens": tokens,
                "plain_tok_s": plain_tok_s,
                "speculative_tok_s": tokens / statistics.median(times[name]),
                "acceptance_rate": st["acceptance_rate"], "token_acceptance": st["token_acceptance"],
                "tokens_per_target_step": st["tokens_per_seq_step"],
                "engine_draft_cost": st["draft_cost"], "engine_verify_cost": st["verify_cost"],
                **(pass_costs(llm, batch, g, CLOCKS[args.clock])
                   if not (adaptive or st["tree"] or name.endswith("-loop")) else {}),
                "plain_share": st["spec_chose_plain"] / max(1, st["spec_chose_plain"] + st["spec_seq_steps"]),
                "identical_tokens": outs["plain"] == outs[name],
            }
            row["speedup"] = row["speculative_tok_s"] / plain_tok_s
            print(f"batch {batch}: {row}", file=sys.stderr)
            rows.append(row)
        if "hf_plain" in times:
            hf_plain, hf_assisted = (tokens / statistics.median(times[k]) for k in ("hf_plain", "hf_assisted"))
            peer = {"batch": batch, "tokens": tokens, "memfit_plain_tok_s": plain_tok_s,
                    "hf_plain_tok_s": hf_plain, "hf_assisted_tok_s": hf_assisted,
                    "hf_assisted_vs_hf_plain": hf_assisted / hf_plain,
                    "memfit_speculative_tok_s": {name: tokens / statistics.median(times[name]) for name in specs},
                    "hf_identical_tokens": outs["hf_plain"] == outs["plain"] == outs["hf_assisted"]}
            print(f"peer: {peer}", file=sys.stderr)
        for _, _, llm in specs.values():
            llm.engine.close()
        plain.engine.close()
    result = {"benchmark": "speculative", **header(args.threads, args.seed), "dtype": args.dtype,
              "clock": args.clock, "reps": args.reps, "requests_per_slot": args.requests_per_slot, "target": args.model, "draft": args.draft,
              "rows": rows, "hf_peer": peer}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
