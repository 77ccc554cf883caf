"""Check `memfit fit` against a real run: the RSS a model adds when the engine loads it and serves a batch,
beside the prediction, as JSON. Run in a fresh process (`memfit fit --measure` starts one):

    python -m memfit.llm.engine.fitcheck MODEL --batch 8 --context 192 [--dtype bfloat16] [--cpu-linear auto]

The baseline is taken after torch and memfit's engine are imported, as `fit` defines `total_bytes`, and
nothing else has run: no warm-up, so the runtime's one-time costs (library code paged in, allocator pools)
are part of what is measured, as a user's process pays them. What is measured is the memory the process holds
(`HeldMemoryMeter`: anonymous and shared pages plus the model's mapped files), as the calibration measures it;
shared libraries' code pages are left out, since how many of them a fault maps depends on the page cache. The workload runs twice on the same engine
(`--rounds`), as a server sees batch after batch. Both the growth at the end and the peak are reported.
"""
from __future__ import annotations

import argparse
import json

from memfit.memory.measure import HeldMemoryMeter, rss_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--cpu-linear", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--speculative-model", default=None)
    ap.add_argument("--num-speculative-tokens", type=int, default=None)
    ap.add_argument("--speculative-tree", default=None)  # W,D: greedy and sampled requests draft trees
    ap.add_argument("--no-prepack", dest="prepack", action="store_false")  # plain F.linear, as `memfit fit` predicts
    ap.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false")
    a = ap.parse_args()
    before_import = rss_bytes()
    import torch

    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams
    from memfit.llm.engine.fit import predict_for_engine
    from memfit.llm.models.config import parse_dtype
    import_rss = rss_bytes()

    from memfit.llm.models.loader import resolve_model_path

    torch.set_num_threads(1)
    model_dir = resolve_model_path(a.model)
    with HeldMemoryMeter(files_under=[model_dir]) as load:
        engine = LLMEngine(EngineConfig(model=a.model, max_num_seqs=a.batch, max_model_len=a.context, dtype=a.dtype,
                                        max_num_batched_tokens=a.chunk, cpu_linear=a.cpu_linear,
                                        memory_budget=a.memory_budget, speculative_model=a.speculative_model,
                                        num_speculative_tokens=a.num_speculative_tokens,
                                        speculative_tree=a.speculative_tree, prepack=a.prepack,
                                        cpu_kernels=a.cpu_kernels))
    vocab = engine.model_config.vocab_size
    with HeldMemoryMeter(files_under=[model_dir]) as run:
        for r in range(a.rounds):
            for i in range(a.batch):
                # as a server sees them: greedy and sampled requests side by side (the runtime's share is measured so)
                params = SamplingParams(max_tokens=a.context // 2, ignore_eos=True,
                                        temperature=0.8 if (i + r) % 2 == 0 else 0,
                                        top_p=0.9, seed=i)
                prompt = [(r * 977 + i * 131 + j * 7) % (vocab - 3) + 3 for j in range(a.context // 2)]
                engine.add_request(prompt_token_ids=prompt, params=params)
            while engine.has_unfinished_requests():
                engine.step()
    base = load.baseline_bytes
    end, peak = run.end_bytes - base, max(load.peak_bytes, run.peak_bytes) - base
    load_peak = load.peak_delta_bytes  # loading alone: packing must not hold weights twice
    b = predict_for_engine(a.model, a.context, a.batch, a.chunk, cpu_linear=a.cpu_linear, prepack=a.prepack,
                           cpu_kernels=a.cpu_kernels,
                           dtype=parse_dtype(a.dtype) if a.dtype else None, speculative_model=a.speculative_model,
                           num_speculative_tokens=a.num_speculative_tokens, speculative_tree=a.speculative_tree)
    print(json.dumps({"measured_end_bytes": end, "measured_peak_bytes": peak, "load_peak_bytes": load_peak,
                      "import_bytes": import_rss - before_import,
                      "predicted_bytes": b.total_bytes, "ledger": engine.ledger.by_owner(),
                      "kv_committed_bytes": engine.kv.committed_bytes, **b.to_dict()}))


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        # memfit.errors is imported only here: importing it before main() would add to the RSS measured.
        import sys

        from memfit.errors import USER_ERRORS

        if not isinstance(exc, USER_ERRORS):
            raise
        # A user's error (a model the loader refuses, a budget too small): one JSON object that `memfit fit
        # --measure` reports as its own refusal, instead of this process's traceback inside its own.
        print(json.dumps({"error": str(exc)}), flush=True)
        print(f"fitcheck: error: {exc}", file=sys.stderr)
        sys.exit(2)
