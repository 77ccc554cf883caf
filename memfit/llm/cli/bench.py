"""`memfit bench`: throughput, latency and memory of the engine on a synthetic workload, as JSON."""
from __future__ import annotations

import json
import platform
import random
import statistics
import time

from memfit.errors import guard
from memfit.llm.cli.common import run_with_engine
from memfit.llm.engine.config import add_engine_args


def cmd_bench(args) -> int:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    return run_with_engine(args, _bench)


def _bench(engine, args) -> int:
    import torch

    from memfit.llm.engine.params import SamplingParams
    from memfit.memory.measure import peak_rss_bytes, rss_bytes

    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    rss0 = rss_bytes()
    start = time.perf_counter()
    arrival, first, last, ntok = {}, {}, {}, {}
    for i, ids in enumerate(prompts):
        rid = engine.add_request(prompt_token_ids=ids, params=params, request_id=f"b{i}")
        arrival[rid] = time.perf_counter()
    peak_committed = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        peak_committed = max(peak_committed, engine.stats()["kv_committed_bytes"])
        for out in outs:
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            ntok[out.request_id] = len(out.token_ids)
    elapsed = time.perf_counter() - start
    generated = sum(ntok.values())
    ttft = [first[r] - arrival[r] for r in first]
    tpot = [(last[r] - first[r]) / (ntok[r] - 1) for r in last if ntok[r] > 1]
    result = {
        "model": args.model, "dtype": str(engine.dtype).replace("torch.", ""), "kv_cache": args.kv_cache,
        "device": str(engine.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "elapsed_s": elapsed, "generated_tokens": generated,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + args.num_prompts * args.input_len) / elapsed,
        "ttft_s": {"p50": _pct(ttft, 50), "p95": _pct(ttft, 95)},
        "tpot_s": {"p50": _pct(tpot, 50), "p95": _pct(tpot, 95)} if tpot else None,
        "kv_committed_peak_bytes": peak_committed, "kv_budget_bytes": engine.model_info.kv_budget_bytes,
        "rss_start_bytes": rss0, "peak_rss_bytes": peak_rss_bytes(), "steps": engine.num_steps,
    }
    if engine.spec is not None:  # --speculative-model: acceptance, tokens per target pass, the draft's KV
        result["speculative"] = engine.stats()["speculative"]
    print(json.dumps(result, indent=2 if args.pretty else None))
    return 0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def register(sub) -> None:
    p = sub.add_parser("bench", help="throughput, latency and memory of the engine, as JSON")
    p.add_argument("--num-prompts", type=int, default=16, help="requests, all submitted at the start (default 16)")
    p.add_argument("--input-len", type=int, default=64, help="random prompt tokens per request (default 64)")
    p.add_argument("--output-len", type=int, default=64,
                   help="tokens generated per request, greedy, end-of-sequence ignored (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--pretty", action="store_true", help="indent the JSON object")
    # A refusal prints nothing on stdout unless --json is given: the help says what happens.
    p.add_argument("--json", action="store_true",
                   help="a finished run prints its one JSON object either way; with --json a refusal also prints one, "
                        '{"error": message}, on stdout')
    add_engine_args(p)
    p.set_defaults(func=guard(cmd_bench))
