"""Tensor-parallel decode on this machine: throughput and per-rank memory at N = 1 and N = 2, and what the
collectives cost a step.

Random-initialised Llama shapes (benchmarks/decode_setup.py: 0.1B, and Qwen2.5-0.5B's with --shapes 0.5b), bf16,
one thread per rank, `batch` sequences of 64-token prompts decoding `--new-tokens` greedy tokens. Three engines
per shape and batch, alternating `--reps` times:
- n1: one rank, the default path (memfit's C++ decode stack: a whole step in one call);
- n1_layers: one rank, layer by layer (the stack switched off): the path every rank of a TP engine runs, since
  the stack cannot all-reduce between attention and MLP;
- n2: two ranks (rank 0 spawns one worker), gloo on the CPU.
Per run: wall ms per decode step (the machine is shared: wall time moves with other jobs; the variants alternate
so a load change hits them alike), rank 0's CPU ms per step, and for n2 the wall time rank 0 spends inside
collectives (2 all-reduces per layer, the embedding's, the logits' all-gather; this includes waiting for the other
rank) and in sending the step message. Memory per rank: the ledger's weights and KV reservations and VmRSS.

Separately, `allreduce_us`: the latency of one gloo all-reduce of a decode step's (batch, hidden) bf16 activations
between two ready processes (median of 200), times the 2L+1 all-reduces a step makes.

With --speculative: batched speculative decoding against batched vanilla on the bundled pair (memfit-tiny with
memfit-tiny-draft, float32, g 2, the prompts of benchmarks/speculative.py, 64 greedy tokens), at one rank and at
two (the draft on rank 0, verification on both), alternating; tokens per second of the whole generate() call.

NCCL is not measured: this machine has no GPU (the NCCL path is chosen at run time on CUDA).

    OMP_NUM_THREADS=1 python -m benchmarks.tensor_parallel --reps 3 --out benchmarks/results/tensor_parallel.json
    OMP_NUM_THREADS=1 python -m benchmarks.tensor_parallel --speculative --reps 3 --batches 1,8 \
        --out benchmarks/results/tensor_parallel_speculative.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, header, pin_threads

PROMPT_LEN = 64


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(group, name: str, acc: dict) -> None:
    """Wrap group.<name> so rank 0 adds the wall seconds spent in it to acc[name]."""
    inner = getattr(group, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

    setattr(group, name, wrapper)


def run(path: Path, variant: str, batch: int, new_tokens: int, seed: int) -> dict:
    import torch

    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams

    tp = 2 if variant == "n2" else 1
    engine = LLMEngine(EngineConfig(model=str(path), max_num_seqs=batch, max_model_len=512, threads=1,
                                    tensor_parallel_size=tp, max_num_batched_tokens=max(512, batch * PROMPT_LEN)))
    if variant == "n1_layers":
        engine.runner.stack = None
    acc: dict[str, float] = {}
    if tp > 1:
        for name in ("all_reduce", "all_gather_last", "send"):
            _timed(engine.tp, name, acc)
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        engine.add_request(prompt_token_ids=torch.randint(5, vocab, (PROMPT_LEN,), generator=g).tolist(),
                           params=SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0))
    while engine.stats()["num_waiting"] or any(not s.output_token_ids for s in engine.scheduler.running):
        engine.step()  # prefill every prompt first
    acc.clear()
    steps0, cpu, wall = engine.num_steps, time.process_time(), time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    steps = engine.num_steps - steps0
    wall_s = time.perf_counter() - wall
    by_part = engine.ledger.by_owner()
    ranks = [os.getpid()] + ([p.pid for p in engine.tp.procs] if tp > 1 else [])
    out = {"variant": variant, "batch": batch, "decode_steps": steps,
           "wall_ms_per_step": wall_s / steps * 1e3, "rank0_cpu_ms_per_step": (time.process_time() - cpu) / steps * 1e3,
           "tokens_per_s": batch * steps / wall_s,
           "rank0_weights_bytes": by_part.get("weights", 0), "rank0_kv_budget_bytes": engine.kv_budget.limit_bytes,
           "rank0_kv_bytes_per_token": engine.layout.bytes_per_token, "rss_bytes_per_rank": [_rss(p) for p in ranks]}
    if tp > 1:
        coll = acc.get("all_reduce", 0.0) + acc.get("all_gather_last", 0.0)
        out.update(collective_ms_per_step=coll / steps * 1e3, send_ms_per_step=acc.get("send", 0.0) / steps * 1e3,
                   collective_share_of_step=coll / wall_s)
    engine.close()
    return out


def _allreduce_worker(rank: int, port: int, shapes: list, reps: int, q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for rows, cols in shapes:
        t = torch.randn(rows, cols).to(torch.bfloat16)
        times = []
        for i in range(reps + 20):
            dist.barrier()
            s = time.perf_counter()
            dist.all_reduce(t)
            if i >= 20:
                times.append(time.perf_counter() - s)
        res[f"{rows}x{cols}"] = statistics.median(times) * 1e6
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def allreduce_latency(shapes: list, reps: int = 200) -> dict:
    import torch.multiprocessing as mp

    from memfit.llm.parallel.group import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, shapes, reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join()
    return res


def run_speculative(tp: int, spec: bool, batch: int) -> dict:
    from benchmarks.speculative import PROMPTS
    from memfit.llm import LLM, SamplingParams

    opts = dict(speculative_model="memfit-tiny-draft", num_speculative_tokens=2) if spec else {}
    # the engine's and server's step, as the committed results ran (LLM's own CPU default is 2048)
    llm = LLM(model="memfit-tiny", dtype="float32", threads=1, max_num_seqs=batch, tensor_parallel_size=tp,
              max_num_batched_tokens=512, **opts)
    prompts = (PROMPTS * -(-batch // len(PROMPTS)))[:batch]
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    wall = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - wall
    stats = llm.engine.stats()["speculative"]
    llm.engine.close()
    return {"tp": tp, "speculative": spec, "batch": batch, "tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
            "acceptance": stats.get("token_acceptance"), "tokens": [o.outputs[0].token_ids for o in outs]}


def main_speculative(a) -> int:
    runs, summary = [], {}
    for batch in [int(b) for b in a.batches.split(",")]:
        for rep in range(a.reps):
            for tp in (1, 2):
                for spec in (False, True):
                    r = run_speculative(tp, spec, batch)
                    runs.append(r)
                    print(f"[tensor_parallel] speculative batch {batch} rep {rep} tp {tp} spec {spec}: "
                          f"{r['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
        for tp in (1, 2):
            cell = {}
            for spec in (False, True):
                rs = [r for r in runs if r["batch"] == batch and r["tp"] == tp and r["speculative"] == spec]
                cell["speculative" if spec else "plain"] = statistics.median(r["tokens_per_s"] for r in rs)
                if spec:
                    cell["acceptance"] = statistics.median(r["acceptance"] for r in rs)
            cell["speculative_over_plain"] = cell["speculative"] / cell["plain"]
            summary[f"b{batch} tp{tp}"] = cell
    for batch in {r["batch"] for r in runs}:  # greedy speculation is lossless: every variant's tokens alike
        rs = [r for r in runs if r["batch"] == batch]
        summary[f"b{batch} same_tokens"] = all(r["tokens"] == rs[0]["tokens"] for r in rs)
    for r in runs:
        r.pop("tokens")
    emit({"benchmark": "tensor_parallel", "mode": "speculative", **header(1, note="one thread per rank; 2 cores shared"),
          "runs": runs, "median": summary, "nccl": "not measured: no GPU on this machine"}, a.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="0.1b", help="comma-separated: 0.1b,0.5b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--speculative", action="store_true", help="speculative against plain decoding at 1 and 2 ranks")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pin_threads(1)
    if a.speculative:
        return main_speculative(a)
    from benchmarks.decode_setup import SHAPES, make_model_dir

    batches = [int(b) for b in a.batches.split(",")]
    runs, summary, latency = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="memfit-tp-bench-") as tmp:
        for shape in a.shapes.split(","):
            path = make_model_dir(shape, "bfloat16", Path(tmp))
            hidden, layers = SHAPES[shape]["hidden_size"], SHAPES[shape]["num_hidden_layers"]
            for batch in batches:
                for rep in range(a.reps):
                    for variant in ("n1", "n1_layers", "n2"):
                        r = run(path, variant, batch, a.new_tokens, rep)
                        r["shape"] = shape
                        runs.append(r)
                        print(f"[tensor_parallel] {shape} batch {batch} rep {rep} {variant}: "
                              f"{r['wall_ms_per_step']:.1f} ms/step", file=sys.stderr, flush=True)
                cell = {}
                for variant in ("n1", "n1_layers", "n2"):
                    rs = [r for r in runs if r["shape"] == shape and r["batch"] == batch and r["variant"] == variant]
                    keys = ["wall_ms_per_step", "rank0_cpu_ms_per_step", "tokens_per_s"] + (
                        ["collective_ms_per_step", "send_ms_per_step", "collective_share_of_step"] if variant == "n2" else [])
                    cell[variant] = {k: statistics.median(r[k] for r in rs) for k in keys}
                    cell[variant]["rss_bytes_per_rank"] = rs[-1]["rss_bytes_per_rank"]
                    cell[variant]["rank0_weights_bytes"] = rs[-1]["rank0_weights_bytes"]
                    cell[variant]["rank0_kv_bytes_per_token"] = rs[-1]["rank0_kv_bytes_per_token"]
                summary[f"{shape} b{batch}"] = cell
            lat = allreduce_latency([(b, hidden) for b in batches])
            latency[shape] = {k: {"allreduce_us": v, "per_step_ms": v * (2 * layers + 1) / 1e3} for k, v in lat.items()}
    emit({"benchmark": "tensor_parallel", **header(1, note="one thread per rank; 2 cores shared with other jobs"),
          "prompt_len": PROMPT_LEN, "new_tokens": a.new_tokens, "runs": runs, "median": summary,
          "gloo_allreduce_latency": latency, "nccl": "not measured: no GPU on this machine"}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
