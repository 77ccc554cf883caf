"""Run in a fresh process by test_memory_budget.py: serve a KV-heavy workload on the bundled model, with or
without a whole-process `memory_budget`, and print the memory it added (at the end and at the peak) as JSON.

The baseline is taken after torch and memfit's engine are imported, before the engine is built, so the
growth covers everything the ledger is meant to bound: weights, tokenizer, runtime, steps and KV. Measured by
the kernel as the memory the process holds (`HeldMemoryMeter`: anonymous and shared pages plus the model's
mapped files), leaving out shared libraries' code pages, whose count depends on the page cache.
"""
from __future__ import annotations

import argparse
import json

from memfit.memory.measure import HeldMemoryMeter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=900)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()
    import torch

    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams

    from memfit.llm.models.loader import resolve_model_path

    torch.set_num_threads(1)
    with HeldMemoryMeter(files_under=[resolve_model_path("memfit-tiny")]) as meter:
        engine = LLMEngine(EngineConfig(model="memfit-tiny", memory_budget=a.memory_budget, max_num_seqs=a.requests,
                                        max_model_len=1024, max_num_batched_tokens=512))
        params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
        for i in range(a.requests):
            engine.add_request(prompt_token_ids=[(i * 31 + j * 7) % 4000 + 5 for j in range(a.prompt)], params=params)
        finished = 0
        max_running = 0
        while engine.has_unfinished_requests():
            max_running = max(max_running, engine.stats()["num_running"])
            finished += sum(o.finished for o in engine.step())
    print(json.dumps({"end_bytes": meter.end_delta_bytes, "peak_bytes": meter.peak_delta_bytes, "finished": finished,
                      "max_running": max_running, "budget_bytes": engine.ledger.limit_bytes,
                      "ledger": engine.ledger.by_owner(), "kv_share_bytes": engine.kv_budget.limit_bytes}))


if __name__ == "__main__":
    main()
