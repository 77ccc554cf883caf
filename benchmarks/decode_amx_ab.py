"""memfit's decode attention on AMX tiles against its AVX-512 path, inside the engine, per KV layout (the default
mode, MEMFIT_DECODE_AMX=auto, takes the tiles where a sequence's rows lie in runs; this A/B sets each path itself).

One engine (a random-initialised Llama in bf16, 0.1b unless `--shape` says, one thread) prefills `batch` prompts of
`prompt-len` random tokens, then decodes; the decode attention path is switched every `switch` steps (tiles;
AVX-512 with its default one-pass threshold; tiles head by head), so the three read the same growing KV within one
process. Each step's CPU time is recorded; the medians per path are reported, for the virtual cache in its default
per-layer layout (`virtual`) and head-major (`virtual-head-major`: a head's rows one run) and for the paged one.
Needs a core with AMX-BF16 (else it says so and exits 2).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_amx_ab --out benchmarks/results/decode_amx_ab.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, header, pin_threads

# path -> (AMX on, one-pass threshold: -1 the per-path default, 2**62 head by head)
PATHS = {"amx": (True, -1), "avx512": (False, -1), "amx_head_by_head": (True, 2**62)}
CACHES = {"virtual": ("virtual", "per-layer"), "virtual-head-major": ("virtual", "head-major"), "paged": ("paged", "auto")}


def run_cache(cache: str, batch: int, prompt_len: int, new_tokens: int, switch: int, root: Path,
              shape: str = "0.1b") -> dict:
    from benchmarks.decode_setup import make_model_dir
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams
    from memfit.llm.kernels.decode import set_by_seq_min_bytes, set_decode_amx

    path = make_model_dir(shape, "bfloat16", root)
    kv_cache, kv_layout = CACHES[cache]
    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", kv_budget="4GiB", max_num_seqs=batch,
                                    max_num_batched_tokens=batch * prompt_len, max_model_len=prompt_len + new_tokens,
                                    device="cpu", kv_cache=kv_cache, kv_layout=kv_layout))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(batch):
        ids = torch.randint(0, engine.model_config.vocab_size, (prompt_len,), generator=g).tolist()
        engine.add_request(prompt_token_ids=ids, params=params)
    engine.step()  # prefill and the first token
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    names, i = list(PATHS), 0
    try:
        while engine.has_unfinished_requests():
            name = names[(i // switch) % len(names)]
            amx, min_bytes = PATHS[name]
            set_decode_amx(amx)
            set_by_seq_min_bytes(min_bytes)
            t = time.process_time()
            engine.step()
            times[name].append(time.process_time() - t)
            i += 1
    finally:
        set_decode_amx(False)
        set_by_seq_min_bytes(-1)
        engine.close()
    ms = {p: round(1e3 * statistics.median(v), 2) for p, v in times.items() if v}
    return {"kv_cache": cache, "step_ms": ms, "steps": {p: len(v) for p, v in times.items()},
            "amx_over_avx512": round(ms["amx"] / ms["avx512"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.1b", choices=["0.1b", "0.5b", "1b"],
                    help="the random-initialised Llama (benchmarks/decode_setup.py): 0.1b has 512-byte per-layer K rows "
                         "(4 KV heads of 64), 0.5b 256 bytes (2), 1b 1 KiB (8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=4000)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--switch", type=int, default=4, help="decode steps on one path before the next")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm.kernels.decode import decode_amx_on, set_decode_amx

    set_decode_amx(True)
    if not decode_amx_on():
        print("no AMX decode attention here (no AMX-BF16, MEMFIT_CPU_ISA hides it, or Linux refused)", file=sys.stderr)
        return 2
    set_decode_amx(False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_cache(c, args.batch, args.prompt_len, args.new_tokens, args.switch, Path(tmp), args.shape)
                for c in args.caches]
        for r in rows:
            print(r, file=sys.stderr)
    result = {"benchmark": "decode_amx_ab", "machine": header(args.threads), "model": args.shape, "dtype": "bfloat16",
              "batch": args.batch, "prompt_len": args.prompt_len, "switch": args.switch,
              "timed": "CPU time of each engine step after the prefill; medians per path", "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
