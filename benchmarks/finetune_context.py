"""The longest context (or the largest batch) each host-memory design fits in a fixed budget: MemAscend's claim
that the memory it frees buys longer sequences or larger batches (issue 18's 4x-context target).

    python -m benchmarks.finetune_context --shape 0.5b --budget-seq 2048 --threads 1 \
        --out benchmarks/results/finetune_context_0.5b.json
    python -m benchmarks.finetune_context --shape 0.5b --budget-seq 2048 --axis batch --threads 1 \
        --out benchmarks/results/finetune_context_0.5b_batch.json
    python -m benchmarks.finetune_context --shape 0.1b --budget-seq 2048 --reference zero-infinity-tuned \
        --max-factor 4 --threads 1 --out benchmarks/results/finetune_context_0.1b_tuned.json

The budget is the `--reference` design's peak RSS at `--budget-seq` tokens, batch 1 (the issue's definition with
`zero-infinity`, the default; `zero-infinity-tuned` is the rival with its buffers tuned for memory). Then each
design runs one training step per point of a doubling ladder (sequence length `--budget-seq` x 1, 2, 4, ... at
batch 1; or with `--axis batch`, batch 1, 2, 4, ... at `--budget-seq` tokens), each in a fresh process
(`benchmarks.finetune_offload`'s worker: SSD offload, recomputation, random-initialised shape), until its peak
RSS exceeds the budget. Reported per design: the peak at every point tried, the largest point within the
budget, and its factor over the reference point.

Peak memory does not depend on the machine's load, so one step per point suffices (the first step pays every
pool's first touch, so it is the peak); step times are recorded, not compared. Batches really have the length:
the data are long multi-turn conversations built from ../shared/data/dummy_conversation.json's turns (real
text, loss on the assistant turns), each cut at the length, and the benchmark checks that every example used was
cut (the dummy conversations alone are ~40 tokens).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import emit, header, preset_threads
from benchmarks.finetune_offload import DATA, SHAPES, _cache_dir

DESIGNS = ("zero-infinity", "zero-infinity-tuned", "memascend")


def long_conversations(src: Path, out: Path, min_tokens: int, n: int = 2) -> Path:
    """`n` chat-format conversations of at least `min_tokens` tokens each (memfit-tiny's tokenizer, the one the
    worker trains with), made by chaining the source file's ShareGPT conversations turn after turn."""
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model_path("memfit-tiny"))
    roles = {"human": "user", "gpt": "assistant"}
    turns = [(roles[t["from"]], t["value"]) for c in json.loads(src.read_text()) for t in c["conversations"]
             if t["from"] in roles]
    lines, i = [], 0
    for _ in range(n):
        messages, tokens = [], 0
        while tokens < min_tokens * 1.1 or messages[-1]["role"] != "assistant":
            role, text = turns[i % len(turns)]
            i += 1
            if messages and messages[-1]["role"] == role:
                continue  # keep user / assistant alternating
            messages.append({"role": role, "content": text})
            tokens += len(tok.encode(text)) + 4  # + the template's markers, roughly
        lines.append(json.dumps({"messages": messages}))
    out.write_text("\n".join(lines) + "\n")
    return out


def one_step(design: str, shape: str, seq_len: int, data: Path, threads: int, ssd_dir: str | None,
             batch: int = 1) -> dict:
    with tempfile.TemporaryDirectory(dir=ssd_dir or _cache_dir()) as swap:
        cmd = [sys.executable, "-m", "benchmarks.finetune_offload", "--worker", "--design", design, "--shape", shape,
               "--offload", "ssd", "--ssd-dir", swap, "--steps", "1", "--batch-size", str(batch), "--seq-len", str(seq_len),
               "--data", str(data), "--threads", str(threads)]
        print(f"{design} at {seq_len} tokens, batch {batch} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:  # killed by the kernel's OOM killer, or a MemoryError
        return {"seq_len": seq_len, "batch_size": batch, "failed": f"exit {done.returncode}"}
    r = json.loads(done.stdout.strip().splitlines()[-1])
    stats = r["data"]
    if stats["truncated"] < stats["used"]:
        raise SystemExit(f"an example shorter than {seq_len} tokens was used: the batch would not have the length")
    return {"seq_len": seq_len, "batch_size": batch, "peak_rss_bytes": r["peak_rss_bytes"], "step_seconds": r["step_seconds"],
            "allocator_peak_bytes": r["allocator_peak_bytes"], "pools": r["host_memory"]["pools"],
            "other_bytes": r["host_memory"]["other_bytes"], "loss": r["losses"][0]}


def draw(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "seq_len" if result["axis"] == "seq" else "batch_size"
    fig, ax = plt.subplots(figsize=(6, 4))
    for design, run in result["designs"].items():
        pts = [(p[key], p["peak_rss_bytes"] / 2**30) for p in run["points"] if "peak_rss_bytes" in p]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=design)
    ax.axhline(result["budget_bytes"] / 2**30, color="k", ls="--", lw=1,
               label=f"budget: {result.get('reference', 'zero-infinity')} at {result['budget_seq']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)" if key == "seq_len" else f"batch ({result['budget_seq']} tokens each)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"largest {'context' if key == 'seq_len' else 'batch'} in a fixed budget, {result['shape']} Llama, SSD offload", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def ladder(design: str, budget: int, budget_seq: int, axis: str, max_factor: int, step, reference: dict | None = None
           ) -> dict:
    """One design's doubling ladder: `step(seq_len, batch)` (one training step's point) at factor 1, 2, 4, ... of
    the reference point until a point fails or passes `budget` (bytes) or the factor passes `max_factor`.
    `reference`, the budget's own point, stands for factor 1 when this design is the reference."""
    key = "seq_len" if axis == "seq" else "batch_size"
    points = [reference] if reference else []
    factor = 1 if points else 0
    while True:
        factor = factor * 2 if factor else 1
        if factor > max_factor:
            break
        seq, batch = (budget_seq * factor, 1) if axis == "seq" else (budget_seq, factor)
        point = step(seq, batch)
        points.append(point)
        # one line per point on stderr, so a run cut short still leaves what it measured
        print(f"{design} {seq} x {batch}: {point.get('peak_rss_bytes', point.get('failed'))}", file=sys.stderr,
              flush=True)
        if "failed" in point or point["peak_rss_bytes"] > budget:
            break
    fits = [q[key] for q in points if q.get("peak_rss_bytes", budget + 1) <= budget]
    best = max(fits) if fits else None
    reference_point = budget_seq if axis == "seq" else 1
    return {"points": points, "largest_within_budget": best, "factor": best / reference_point if best else None,
            "capped": bool(best and best >= reference_point * max_factor)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--budget-seq", type=int, default=2048, help="the budget is the reference's peak at this length")
    p.add_argument("--reference", default="zero-infinity", choices=DESIGNS,
                   help="the design whose peak at --budget-seq tokens, batch 1, is the budget")
    p.add_argument("--axis", default="seq", choices=("seq", "batch"), help="grow the sequence length or the batch")
    p.add_argument("--max-factor", type=int, default=16, help="largest point tried, as a multiple of the reference")
    p.add_argument("--designs", default=None, help="comma-separated (default: the reference, then memascend)")
    p.add_argument("--ssd-dir", default=None, help="swap directory (default: a temporary one under ~/.cache/memfit)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    designs = (args.designs or f"{args.reference},memascend").split(",")
    if unknown := set(designs) - set(DESIGNS):
        p.error(f"unknown design(s) {sorted(unknown)}; choose from {DESIGNS}")
    with tempfile.TemporaryDirectory() as tmp:
        longest = args.budget_seq * (args.max_factor if args.axis == "seq" else 1)
        data = long_conversations(Path(args.data), Path(tmp) / "long.jsonl", longest,
                                  n=2 if args.axis == "seq" else args.max_factor)
        reference = one_step(args.reference, args.shape, args.budget_seq, data, args.threads, args.ssd_dir)
        if "failed" in reference:
            raise SystemExit(f"the reference run failed ({reference['failed']})")
        budget = reference["peak_rss_bytes"]
        print(f"budget: {args.reference} at {args.budget_seq} x 1: {budget}", file=sys.stderr, flush=True)
        runs = {}
        for design in designs:
            def step(seq: int, batch: int, design: str = design) -> dict:
                return one_step(design, args.shape, seq, data, args.threads, args.ssd_dir, batch)

            runs[design] = ladder(design, budget, args.budget_seq, args.axis, args.max_factor, step,
                                  reference if design == args.reference else None)
    result = {"benchmark": "finetune_context", "axis": args.axis, "shape": args.shape, "budget_seq": args.budget_seq,
              "reference": args.reference, "budget_bytes": budget, "offload": "ssd", "designs": runs,
              **header(args.threads, 0, shared_machine=True)}
    if {args.reference, "memascend"} <= set(runs) and runs[args.reference]["largest_within_budget"]:
        # memascend's largest point over the reference design's own largest point in the same budget
        result["memascend_factor"] = (runs["memascend"]["largest_within_budget"] or 0) / \
            runs[args.reference]["largest_within_budget"]
    emit(result, args.out, draw)
    return result


if __name__ == "__main__":
    preset_threads()
    main()
