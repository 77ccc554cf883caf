"""vLLM's side of benchmarks.decode_throughput, run by it with the python of a venv holding vLLM's CPU build (vLLM
pins its own torch, so it can't share memfit's venv): greedy decode of BATCH random-token prompts of PROMPT_LEN
tokens, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). vLLM's offline `generate` reports no per-token times
on this build, so the decode time is taken as a difference of two `generate` calls on the same prompts.

Why the prompts are cached first: a difference against fresh prompts carries the noise of two 8 x 4000-token
prefills (~14 s each on one core) into ~2 s of decode, and spread 89-176 tok/s over three rounds. So each round
draws fresh prompts, prefills them once (1 output token: vLLM's prefix cache keeps their full blocks), then times
1 and NEW + 1 output tokens on those prompts, alternating which comes first; both calls hit the cache for all but
the prompts' last partial block (the `cached_tokens` recorded), so their difference is NEW decode steps over
BATCH x PROMPT_LEN tokens of context. Prints one line `RESULT {json}`.

    python benchmarks/decode_vllm.py MODEL_DIR BATCH PROMPT_LEN NEW REPS [CLOCK]

CLOCK: "process" (the process's CPU time, the default; what decode_throughput passes at one thread) or "wall"
(several threads: their CPU times would add up), the clock memfit's side is read on (decode_setup.decode_clock).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time


def _run(path: str, batch: int, plen: int, new: int, reps: int, clock_name: str = "process") -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=plen + new + 1,
              enforce_eager=True, seed=0, enable_prefix_caching=True)
    rng = random.Random(0)

    def prompts() -> list:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(32000) for _ in range(plen)]) for _ in range(batch)]

    if clock_name not in ("process", "wall"):
        raise SystemExit(f"CLOCK must be 'process' or 'wall', got {clock_name!r}")
    clock = time.process_time if clock_name == "process" else time.perf_counter

    def timed(ps: list, n: int) -> tuple[float, int]:
        """Seconds (on `clock`) of one generate of n tokens a prompt, and the prompt tokens it found cached."""
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, detokenize=False, ignore_eos=True)
        t = clock()
        outs = llm.generate(ps, params, use_tqdm=False)
        return clock() - t, sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)

    warm = prompts()
    timed(warm, 1)
    timed(warm, new + 1)  # warm-up of both calls
    out: dict = {"version": vllm.__version__, "method": "difference of two calls on prefix-cached prompts",
                 "timer": "process CPU time" if clock_name == "process" else "wall",
                 "full_cpu": [], "first_cpu": [], "cached_tokens": [], "prompt_tokens": batch * plen,
                 "tok_per_s": []}
    for r in range(reps):
        ps = prompts()
        timed(ps, 1)  # prefill: the prompts' full blocks enter the prefix cache
        if r % 2 == 0:
            (first, c1), (full, c2) = timed(ps, 1), timed(ps, new + 1)
        else:
            (full, c2), (first, c1) = timed(ps, new + 1), timed(ps, 1)
        out["full_cpu"].append(full)
        out["first_cpu"].append(first)
        out["cached_tokens"].append([c1, c2])
        out["tok_per_s"].append(batch * new / max(full - first, 1e-9))
    return out


if __name__ == "__main__":
    a = sys.argv[1:]
    print("RESULT " + json.dumps(_run(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), *a[5:6])), flush=True)
