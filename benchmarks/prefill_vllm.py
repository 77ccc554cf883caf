"""vLLM's side of benchmarks.prefill, run by it with the python of a venv holding vLLM's CPU build (vLLM pins its
own torch, so it can't share memfit's venv): prefill of N random-token prompts with one output token each, in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so process CPU time covers the engine), one warm-up batch, then
`reps` rounds of the batch and of one prompt alone. Prints one line `RESULT {json}`.

    python benchmarks/prefill_vllm.py MODEL_DIR PROMPTS PROMPT_LEN REPS
"""
from __future__ import annotations

import json
import os
import random
import sys
import time


def _run(path: str, n: int, plen: int, reps: int) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024, enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
    rng = random.Random(0)

    def prompts(k: int) -> list:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(32000) for _ in range(plen)]) for _ in range(k)]

    llm.generate(prompts(n), params, use_tqdm=False)  # warm-up
    out: dict = {"version": vllm.__version__, "batch_wall": [], "batch_cpu": [], "one_wall": [], "one_cpu": []}
    for _ in range(reps):
        for key, k in (("batch", n), ("one", 1)):
            ps = prompts(k)
            t, c = time.perf_counter(), time.process_time()
            llm.generate(ps, params, use_tqdm=False)
            out[f"{key}_wall"].append(time.perf_counter() - t)
            out[f"{key}_cpu"].append(time.process_time() - c)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(_run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))), flush=True)
