"""Soak: does the engine's memory stay flat over many requests of varied length?

Rounds of random-length requests (greedy, fixed output length) run to completion; after each round the
script records process RSS and committed KV. A server's memory must level off after warm-up: a steady
climb with flat KV means some per-request or per-shape state is piling up.

    OMP_NUM_THREADS=1 python -m benchmarks.engine_soak --rounds 24 --kv-cache paged

Prints one JSON object (rows per round, plus the growth of the last third of the rounds); --out also writes
it and a PNG of RSS and committed KV by round beside it. After the last round the engine sits idle for
`--reclaim-idle-s` (plus a little) and is asked to maintain itself, as a server's idle loop does: the row
`idle` shows what KV it still holds then (only the watermark, 0 by default).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
from pathlib import Path

from benchmarks.common import emit, header, pin_threads
from memfit.llm.engine import EngineConfig, LLMEngine
from memfit.llm.engine.params import SamplingParams
from memfit.memory.measure import rss_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="memfit-tiny")
    ap.add_argument("--kv-cache", default="virtual", choices=["virtual", "paged"])
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--requests", type=int, default=24, help="requests per round")
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reclaim-idle-s", type=float, default=2.0, help="the engine's kv_reclaim_idle_s")
    ap.add_argument("--out", default=None, help="also write the JSON here (and a PNG beside it)")
    a = ap.parse_args()
    pin_threads(a.threads)
    engine = LLMEngine(EngineConfig(model=a.model, kv_cache=a.kv_cache, kv_budget="256MiB",
                                    kv_reclaim_idle_s=a.reclaim_idle_s))
    rng = random.Random(a.seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    rows = []
    for rnd in range(a.rounds):
        lengths = [rng.randrange(a.min_len, a.max_len) for _ in range(a.requests)]
        for n in lengths:
            engine.add_request(prompt_token_ids=[rng.randrange(vocab) for _ in range(n)], params=params)
        while engine.has_unfinished_requests():
            engine.step()
        gc.collect()
        st = engine.kv.stats()
        rows.append({"round": rnd, "rss_bytes": rss_bytes(), "kv_committed_bytes": st.committed_bytes})
        print(json.dumps(rows[-1]), file=sys.stderr)
    import time

    time.sleep(a.reclaim_idle_s + 0.5)
    engine.maintain()
    idle = {"rss_bytes": rss_bytes(), "kv_committed_bytes": engine.kv.stats().committed_bytes}
    print(json.dumps({"idle": idle}), file=sys.stderr)
    third = max(1, a.rounds // 3)
    tail = rows[-third:]
    result = {
        "benchmark": "engine_soak", **header(a.threads, a.seed), "model": a.model, "kv_cache": a.kv_cache,
        "requests_per_round": a.requests, "prompt_len_range": [a.min_len, a.max_len], "output_len": a.output_len,
        "rows": rows, "reclaim_idle_s": a.reclaim_idle_s, "idle": idle,
        "rss_growth_per_round_last_third_bytes": (tail[-1]["rss_bytes"] - tail[0]["rss_bytes"]) / max(1, len(tail) - 1),
        "rss_growth_per_round_first_third_bytes": (rows[third - 1]["rss_bytes"] - rows[0]["rss_bytes"]) / max(1, third - 1),
    }
    emit(result, a.out, plot)
    return 0


def plot(result: dict, png: Path) -> None:
    """RSS and committed KV after each round: a server's memory must level off, not climb."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(rounds, [r["rss_bytes"] / 1e6 for r in result["rows"]], marker="o", label="process RSS")
    ax.plot(rounds, [r["kv_committed_bytes"] / 1e6 for r in result["rows"]], marker=".",
            label="KV committed (after the round)")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_title(f"engine soak: {result['model']}, {result['kv_cache']} KV, {result['requests_per_round']} requests/round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
