"""Run in a fresh process by test_fit.py: measure the peak memory the engine adds for a model, context
and batch, and print it beside `memfit fit`'s prediction as JSON.

One-time runtime costs (library code paged in, allocator pools, oneDNN kernels) do not depend on the
model, and `fit` does not predict them; a warm-up run on a tiny model of the same family pays them before
the baseline is taken.

The workload runs twice on the same engine (`--rounds`), as a server sees batch after batch: `fit` adds the
prefill's activations to *all* the weights, but in a first round the memory-mapped embedding table is not
resident yet while the prefill runs (its pages come in as generated tokens are looked up, presumably through
the kernel's fault-around), so a single round's peak is that of a process whose peaks do not coincide
(0.89-0.92 of the prediction with memfit's blocked kernel); from the second round on, a prefill meets a
resident table.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from memfit.llm.engine import EngineConfig, LLMEngine
from memfit.llm.engine.fit import predict
from memfit.llm.models.config import ModelConfig
from memfit.llm.engine.params import SamplingParams
from memfit.memory.measure import peak_rss_bytes, reset_peak_rss, rss_bytes


def run(path: Path, batch: int, ctx: int, prepack: bool, cpu_linear: str = "auto", rounds: int = 1) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(path), kv_budget="2GiB", max_num_seqs=batch, max_model_len=ctx,
                                    prepack=prepack, max_num_batched_tokens=512, cpu_linear=cpu_linear))
    params = SamplingParams(max_tokens=ctx // 2, temperature=0, ignore_eos=True)
    for _ in range(rounds):
        for _ in range(batch):
            engine.add_request(prompt_token_ids=list(range(1, ctx // 2 + 1)), params=params)
        while engine.has_unfinished_requests():
            engine.step()
    return engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("warmup_model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prepack", type=int, default=1)
    ap.add_argument("--cpu-linear", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    warm = run(Path(a.warmup_model), a.batch, a.context, bool(a.prepack), a.cpu_linear)
    warm.close()
    del warm
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    engine = run(Path(a.model), a.batch, a.context, bool(a.prepack), a.cpu_linear, a.rounds)
    measured = peak_rss_bytes() - base
    b = predict(ModelConfig.from_dir(a.model), engine.dtype, a.context, a.batch, 512)
    print(json.dumps({"measured_bytes": measured, "predicted_bytes": b.total_bytes, **b.to_dict()}))


if __name__ == "__main__":
    main()
