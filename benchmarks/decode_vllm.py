"""vLLM's side of benchmarks.decode_throughput, run by it with the python of a venv holding vLLM's CPU build (vLLM
pins its own torch, so it can't share memfit's venv): greedy decode of BATCH random-token prompts of PROMPT_LEN
tokens, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). vLLM's offline `generate` reports no per-token times
on this build, so the decode time is taken as a difference: the batch with NEW + 1 output tokens less the same
prompts with 1 (prefill and the first token), over BATCH x NEW tokens. One warm-up, then `reps` rounds, each
pair on fresh prompts (no prefix reuse between them: prefix caching is off). Prints one line `RESULT {json}`.

    python benchmarks/decode_vllm.py MODEL_DIR BATCH PROMPT_LEN NEW REPS
"""
from __future__ import annotations

import json
import os
import random
import sys
import time


def _run(path: str, batch: int, plen: int, new: int, reps: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=plen + new + 1,
              enforce_eager=True, seed=0, enable_prefix_caching=False)
    rng = random.Random(0)

    def prompts() -> list:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(32000) for _ in range(plen)]) for _ in range(batch)]

    def timed(n: int) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, detokenize=False, ignore_eos=True)
        ps = prompts()
        t = time.process_time()
        llm.generate(ps, params, use_tqdm=False)
        return time.process_time() - t

    timed(new + 1)  # warm-up
    out: dict = {"version": vllm.__version__, "full_cpu": [], "first_cpu": [], "tok_per_s": []}
    for _ in range(reps):
        full, first = timed(new + 1), timed(1)
        out["full_cpu"].append(full)
        out["first_cpu"].append(first)
        out["tok_per_s"].append(batch * new / max(full - first, 1e-9))
    return out


if __name__ == "__main__":
    a = sys.argv[1:]
    print("RESULT " + json.dumps(_run(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]))), flush=True)
