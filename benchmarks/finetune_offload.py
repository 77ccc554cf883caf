"""Offloaded full fine-tuning: ZeRO-Infinity's host-memory design against MemAscend's, side by side.

    python -m benchmarks.finetune_offload --shape 0.1b --offload ssd --steps 4 --seq-len 512 --threads 2 \
        --out benchmarks/results/finetune_offload_0.1b.json

Each design runs in a fresh process (peak RSS is per process), on random-initialised Llama shapes with
memfit-tiny's tokenizer, the same data (../shared/data/dummy_conversation.json), seed and steps, so the two
runs differ only in `--host-memory`. The first step is a warm-up (page faults of the pools, file creation);
step time is the median of the rest. Reported per design: peak RSS and its breakdown by pool, step time,
SSD bytes and throughput; and the ratios memascend / zero-infinity.

Step time side by side on a shared machine (`--rounds N`): N rounds of one process per design, the order
alternating from round to round (A B, B A, ...), so a drift in the machine's load falls on both designs alike:

    python -m benchmarks.finetune_offload --shape 0.1b --offload ssd --steps 4 --seq-len 256 --threads 2 \
        --ssd-dir /tmp/bench --designs memascend,zero-infinity-tuned --rounds 5 --out ...

reports, per round, each design's median over its steady-state steps (neither the first, the warm-up, nor with
3 or more steps the last, which the trainer runs under its allocator profiler) of wall time and of the
process's CPU time (all threads: what a step costs whatever else the machine runs), the ratios memascend / rival,
and the 1-minute load before each process (and the 1-, 5- and 15-minute ones before and after it); overall, each
design's median over all its steady steps (and of its optimizer update's time, `optimizer_seconds`, with the part
a pipelined update waits for at the step's end, `optimizer_settle_seconds`) and the median, min and max of the
per-round ratios; with more than one rival, `vs` has memascend's per-round ratios against each. `--layers N` keeps the shape's widths and vocabulary with N decoder layers.

Where the steps' SSD bytes and main-thread time go (`--traffic`, benchmarks/finetune_traffic.py's meter in each
worker): per design the SSD bytes of a steady step by direction and kind (the 16-bit copy, master, moments), and
the medians over the rounds' steady steps of the fetch waits, the head and the update's parts:

    python -m benchmarks.finetune_offload --shape 0.1b --offload ssd --steps 4 --seq-len 256 --threads 1 \
        --ssd-dir /tmp/bench --designs memascend,zero-infinity-pipelined --rounds 4 --traffic --out ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import emit, header, pin_threads, preset_threads

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dummy_conversation.json"
# Llama-family shapes: (vocab, hidden, intermediate, layers, heads, kv heads, tied). 0.1b: a GPT-2-small-sized
# Llama (134M parameters); 0.5b, 1.5b, 3b: Qwen2.5-0.5B's, -1.5B's and -3B's shapes (494M, 1.54B, 3.09B). 3b is the
# largest whose SSD files (about 14 bytes a parameter: fp32 master and moments, the 16-bit copy) fit this machine's disk.
SHAPES = {
    "0.1b": (32000, 768, 2048, 12, 12, 12, False),
    "0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "1.5b": (151936, 1536, 8960, 28, 12, 2, True),
    "3b": (151936, 2048, 11008, 36, 16, 2, True),
}
DESIGNS = ("zero-infinity", "memascend")


def model_config(shape: str, layers: int = 0):
    """The shape's ModelConfig; `layers` > 0 replaces its decoder-layer count (widths and vocabulary kept)."""
    from memfit.llm.models import ModelConfig

    vocab, hidden, inter, own_layers, heads, kv, tied = SHAPES[shape]
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=own_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      max_position_embeddings=32768, tie_word_embeddings=tied, torch_dtype="bfloat16")
    return dataclasses.replace(cfg, num_hidden_layers=layers) if layers else cfg


def steady_steps(steps: int) -> list[int]:
    """The steps that time the steady state: not the first (warm-up: the pools' page faults, file creation),
    nor, with 3 or more, the last (the trainer runs it under its allocator profiler)."""
    return list(range(1, steps - 1)) if steps >= 3 else list(range(min(1, steps - 1), steps))


def worker(args: argparse.Namespace) -> None:
    """One design, one process: print the trainer's result JSON."""
    pin_threads(args.threads)
    from benchmarks.finetune_traffic import TrafficMeter
    from memfit.train.finetune.trainer import MMAP_THRESHOLD, FinetuneConfig, run

    cfg = FinetuneConfig(model="memfit-tiny", data=args.data, offload=args.offload, ssd_dir=args.ssd_dir,
                         host_memory=args.design, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=1e-5, dtype=args.dtype, seed=args.seed,
                         model_config=model_config(args.shape, args.layers),
                         grad_checkpointing="device", mmap_threshold=MMAP_THRESHOLD)
    meter = TrafficMeter()
    if args.traffic:
        meter.install()
    try:
        out = run(cfg).to_json()
    finally:
        meter.uninstall()
    if args.traffic:
        out["traffic"] = meter.result()
    print(json.dumps(out))


def summarise(r: dict) -> dict:
    timed = r["step_seconds"][1:] or r["step_seconds"]
    timed = sorted(timed)
    median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1 : len(timed) // 2 + 1]) / 2
    ssd = r["ssd"]
    steps = len(r["step_seconds"])
    out = {
        "peak_rss_bytes": r["peak_rss_bytes"],
        "peak_above_baseline_bytes": r["peak_rss_bytes"] - r["host_memory"]["baseline_rss_bytes"],
        "pools": r["host_memory"]["pools"],
        "baseline_rss_bytes": r["host_memory"]["baseline_rss_bytes"],
        "baseline_rss_split_bytes": r["host_memory"].get("baseline_rss_split_bytes"),  # anon / file-backed
        "other_bytes": r["host_memory"]["other_bytes"],
        "median_step_seconds": median,
        "steady_median_step_seconds": statistics.median(r["step_seconds"][s] for s in steady_steps(steps)),
        "step_cpu_seconds": r.get("step_cpu_seconds"),  # the process's CPU time (all threads) per step
        "steady_median_step_cpu_seconds": statistics.median(r["step_cpu_seconds"][s] for s in steady_steps(steps))
        if r.get("step_cpu_seconds") else None,
        "step_seconds": r["step_seconds"],
        # the optimizer update's part of each step (AdamW and the waits for its SSD transfers, a pipelined update's
        # writes settled at the step's end included), and of it the waits outside the group updates
        "optimizer_seconds": r.get("optimizer_seconds"),
        "optimizer_settle_seconds": r.get("optimizer_settle_seconds"),
        "losses": r["losses"],
    }
    if "traffic" in r:  # --traffic: per step, SSD bytes by direction and kind, main-thread seconds by part
        out["traffic"] = r["traffic"]
    for key in ("optimizer_seconds", "optimizer_settle_seconds"):
        if r.get(key) and len(r[key]) == steps:
            out[f"steady_median_{key}"] = statistics.median(r[key][s] for s in steady_steps(steps))
    if ssd:
        busy = ssd["read_seconds"] + ssd["write_seconds"]
        out["ssd"] = dict(ssd, bytes_per_step=(ssd["bytes_read"] + ssd["bytes_written"]) / steps,
                          effective_gb_per_s=(ssd["bytes_read"] + ssd["bytes_written"]) / sum(r["step_seconds"]) / 1e9,
                          per_request_gb_per_s=(ssd["bytes_read"] + ssd["bytes_written"]) / busy / 1e9
                          if busy else None)
    return out


def draw(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["designs"]
    names = list(runs)
    pools = sorted({p for r in runs.values() for p in r["pools"]})
    alternated = result.get("step_time", {}).get("ratios")
    fig, axes = plt.subplots(1, 2 if alternated else 1, figsize=(11.5 if alternated else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    bottom = [r["baseline_rss_bytes"] / 2**30 for r in runs.values()]
    ax.bar(names, bottom, label="process baseline (torch, code)", color="0.8")
    for pool in pools + ["other"]:
        vals = [(r["other_bytes"] if pool == "other" else r["pools"].get(pool, 0)) / 2**30 for r in runs.values()]
        ax.bar(names, vals, bottom=bottom, label=pool)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(runs.values()):
        ax.text(i, r["peak_rss_bytes"] / 2**30, f"peak {r['peak_rss_bytes'] / 2**30:.2f} GiB", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title(f"peak host memory, {result['shape']} Llama, offload {result['offload']}, seq {result['seq_len']}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    if alternated:  # the step-time ratios memascend / rival, round by round, with the load before each round
        st, ax = result["step_time"], axes[0][1]
        x = range(1, len(alternated) + 1)
        ax.plot(x, alternated, "o-", label=f"wall time (median {st['ratio_median']:.2f})")
        if st.get("cpu_ratios"):
            ax.plot(x, st["cpu_ratios"], "s--", label=f"CPU time (median {st['cpu_ratio_median']:.2f})")
        ax.axhline(1.05, color="0.5", lw=0.8, ls=":", label="target: within 5%")
        ax.axhline(1.0, color="0.3", lw=0.8)
        loads = [max(r["load_1min"].values()) for r in result["rounds"]]
        for i, load in zip(x, loads):
            ax.annotate(f"{load:.1f}", (i, alternated[i - 1]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
        ax.set_xlabel("round (order alternating; label: the 1-minute load)")
        ax.set_ylabel(f"memascend / {st['ratio_rival']}")
        ax.set_title(f"step time (steady-step medians), {len(alternated)} rounds, {result['threads']} thread(s)",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.1b", choices=sorted(SHAPES))
    p.add_argument("--offload", default="ssd", choices=("host", "ssd"))
    p.add_argument("--ssd-dir", default=None, help="swap directory (default: a temporary one under ~/.cache/memfit)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of one process per design, order alternating; >1 adds per-round step-time ratios")
    p.add_argument("--traffic", action="store_true",
                   help="per step: SSD bytes by kind and main-thread time by part (benchmarks/finetune_traffic.py)")
    p.add_argument("--plan-only", default="",
                   help="designs (comma-separated) to plan, not run: the trainer's host-memory plan pool by pool, for a "
                        "shape too large for them here (every design run is planned too)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--design", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.rounds < 1 or args.layers < 0:
        p.error("--rounds must be >= 1 and --layers >= 0")
    designs = [d for d in args.designs.split(",") if d]
    planned = list(dict.fromkeys(designs + [d for d in args.plan_only.split(",") if d]))
    from memfit.train.finetune.designs import DESIGNS as KNOWN

    unknown = [d for d in planned if d not in KNOWN]
    if unknown:  # before any run: a typo must not cost the runs' minutes
        p.error(f"unknown design(s) {', '.join(unknown)}; choose from {', '.join(KNOWN)}")
    rounds = []
    for i in range(args.rounds):
        order = designs if i % 2 == 0 else designs[::-1]  # alternating: a load drift falls on both designs
        rnd: dict = {"order": order, "load_1min": {}, "load": {}, "designs": {}}
        for design in order:
            rnd["load_1min"][design] = round(os.getloadavg()[0], 2)
            before = [round(x, 2) for x in os.getloadavg()]
            print(f"round {i + 1}/{args.rounds}: running {design} (load {rnd['load_1min'][design]}) ...",
                  file=sys.stderr, flush=True)
            rnd["designs"][design] = run_worker(args, design)
            # the 1-, 5- and 15-minute load averages before and after the process
            rnd["load"][design] = {"before": before, "after": [round(x, 2) for x in os.getloadavg()]}
        rival = _rival(rnd["designs"])
        if rival:
            ma, zi = rnd["designs"]["memascend"], rnd["designs"][rival]
            rnd["step_time_ratio"] = ma["steady_median_step_seconds"] / zi["steady_median_step_seconds"]
            if ma["steady_median_step_cpu_seconds"] and zi["steady_median_step_cpu_seconds"]:
                rnd["step_cpu_ratio"] = ma["steady_median_step_cpu_seconds"] / zi["steady_median_step_cpu_seconds"]
            print(f"round {i + 1}: memascend / {rival} step time {rnd['step_time_ratio']:.3f}", file=sys.stderr)
        rounds.append(rnd)
    runs = {d: r for d, r in rounds[0]["designs"].items()}  # the memory figures: the first round's
    result = {
        "benchmark": "finetune_offload", "shape": args.shape, "layers": model_config(args.shape, args.layers)
        .num_hidden_layers, "offload": args.offload, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "steps": args.steps, "dtype": args.dtype, "designs": runs,
        **header(args.threads, args.seed, shared_machine=True),
    }
    result["plans"] = {d: plan_of(args, d) for d in planned}
    rival = _rival(runs)
    if rival:
        zi, ma = runs[rival], runs["memascend"]
        result["memascend_vs_zero_infinity"] = {
            "rival": rival,
            "peak_rss_ratio": ma["peak_rss_bytes"] / zi["peak_rss_bytes"],
            "peak_rss_reduction": 1 - ma["peak_rss_bytes"] / zi["peak_rss_bytes"],
            "peak_above_baseline_reduction": 1 - ma["peak_above_baseline_bytes"] / zi["peak_above_baseline_bytes"],
            # the first round's, every step included; with --rounds > 1 the comparison is step_time's medians
            "round1_step_time_ratio": ma["median_step_seconds"] / zi["median_step_seconds"],
            "losses_equal": ma["losses"] == zi["losses"],
        }
    if args.rounds > 1:
        result["rounds"] = rounds
        result["step_time"] = alternated(rounds, designs, args.steps)
    if args.traffic:
        result["traffic"] = traffic(rounds, designs, args.steps)
    emit(result, args.out, draw)


def plan_of(args: argparse.Namespace, design: str) -> dict:
    """The trainer's host-memory plan for `design` on this run's shape (trainer.plan_host_memory: the pools sized by
    the same functions that size the real ones), in bytes; the process baseline (interpreter, torch) is not in it."""
    from memfit.train.finetune.trainer import FinetuneConfig, plan_host_memory

    import tempfile

    cfg = FinetuneConfig(model="memfit-tiny", data=args.data, offload=args.offload, host_memory=design,
                         ssd_dir=args.ssd_dir or tempfile.gettempdir(),  # validated, never written: nothing runs
                         batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                         model_config=model_config(args.shape, args.layers), grad_checkpointing="device")
    plan = plan_host_memory(cfg)
    return {"pools": plan.pools, "total_bytes": plan.total}


def run_worker(args: argparse.Namespace, design: str) -> dict:
    """One design in a fresh process (its own peak RSS) on a fresh swap directory: its summary."""
    with tempfile.TemporaryDirectory(dir=args.ssd_dir or _cache_dir()) as swap:
        cmd = [sys.executable, "-m", "benchmarks.finetune_offload", "--worker", "--design", design,
               "--shape", args.shape, "--layers", str(args.layers), "--offload", args.offload, "--ssd-dir", swap,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--dtype", args.dtype, "--data", args.data, "--seed", str(args.seed), "--threads", str(args.threads)]
        cmd += ["--traffic"] if args.traffic else []
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        return summarise(json.loads(done.stdout.strip().splitlines()[-1]))


def _rival(runs: dict) -> str | None:
    """The ZeRO-Infinity design memascend is compared with: the default-buffer one if run, else the tuned one, else
    the tuned one with pipelined optimizer swaps."""
    if "memascend" not in runs:
        return None
    return next((d for d in ("zero-infinity", "zero-infinity-tuned", "zero-infinity-pipelined") if d in runs), None)


def alternated(rounds: list[dict], designs: list[str], steps: int) -> dict:
    """Step time over the rounds: per design the median of all its steady steps, and the per-round ratios
    memascend / rival (median, min, max), each round's two figures taken side by side."""
    steady = steady_steps(steps)
    out: dict = {"steady_steps": steady, "designs": {}}
    for d in designs:
        times = [r["designs"][d]["step_seconds"][s] for r in rounds for s in steady]
        out["designs"][d] = {"median_step_seconds": statistics.median(times), "min": min(times), "max": max(times),
                             "per_round_medians": [r["designs"][d]["steady_median_step_seconds"] for r in rounds]}
        for key in ("optimizer_seconds", "optimizer_settle_seconds"):
            vals = [r["designs"][d][key][s] for r in rounds for s in steady
                    if r["designs"][d].get(key) and len(r["designs"][d][key]) == steps]
            if vals:
                out["designs"][d][f"median_{key}"] = statistics.median(vals)
        cpu = [r["designs"][d]["step_cpu_seconds"][s] for r in rounds for s in steady
               if r["designs"][d]["step_cpu_seconds"]]
        if cpu:
            out["designs"][d]["median_step_cpu_seconds"] = statistics.median(cpu)
    rival = _rival(rounds[0]["designs"])
    for key, name in (("step_time_ratio", "ratio"), ("step_cpu_ratio", "cpu_ratio")):
        ratios = [r[key] for r in rounds if key in r]
        if ratios:
            out["ratio_rival"] = rival
            out[f"{name}s"] = ratios
            out[f"{name}_median"] = statistics.median(ratios)
            out[f"{name}_min"], out[f"{name}_max"] = min(ratios), max(ratios)
    if rival and "ratios" in out:
        out["ratio_of_medians"] = (out["designs"]["memascend"]["median_step_seconds"]
                                   / out["designs"][rival]["median_step_seconds"])
    if "memascend" in designs:  # memascend against every other design run, each round's two figures side by side
        out["vs"] = {d: _round_ratios(rounds, d) for d in designs if d != "memascend"}
    loads = [x for r in rounds for x in r["load_1min"].values()]
    out["load_1min_min"], out["load_1min_max"] = min(loads), max(loads)
    return out


def traffic(rounds: list[dict], designs: list[str], steps: int) -> dict:
    """--traffic over the rounds, per design: the SSD bytes of the first round's first steady step by direction
    and kind (`bytes_constant`: every steady step of every round moved the same), their totals, and the median over
    all rounds' steady steps of each main-thread part (seconds), of the step and optimizer, of the CPU time by
    thread, and of the main thread's voluntary and involuntary context switches (counts)."""
    steady = steady_steps(steps)
    out: dict = {"steady_steps": steady, "designs": {}}
    for d in designs:
        runs = [r["designs"][d] for r in rounds]
        per_step = [run["traffic"]["ssd_bytes"][s] for run in runs for s in steady]
        first = per_step[0]
        parts = {part: statistics.median(run["traffic"]["seconds"][s][part] for run in runs for s in steady)
                 for part in runs[0]["traffic"]["seconds"][0]}
        out["designs"][d] = {
            "ssd_bytes_per_step": first, "bytes_constant": all(b == first for b in per_step),
            "read_bytes_per_step": sum(first["read"].values()), "written_bytes_per_step": sum(first["write"].values()),
            "median_seconds": dict(parts, **{key: statistics.median(run[f"{key}_seconds"][s] for run in runs
                                                                   for s in steady) for key in ("step", "optimizer")}),
            # the CPU account holds seconds by thread and the main thread's context switches (counts), apart here
            **{key: {t: statistics.median(run["traffic"]["cpu"][s][t] for run in runs for s in steady)
                     for t in runs[0]["traffic"]["cpu"][steady[0]] if t.endswith("_switches") == counts}
               for key, counts in (("median_cpu_seconds", False), ("median_main_switches", True))},
        }
    return out


def _round_ratios(rounds: list[dict], rival: str) -> dict:
    """memascend / `rival` per round, of the steady-step medians of wall time, CPU time and optimizer time: each
    list and its median, min and max."""
    out: dict = {}
    for key in ("steady_median_step_seconds", "steady_median_step_cpu_seconds", "steady_median_optimizer_seconds"):
        ratios = [r["designs"]["memascend"][key] / r["designs"][rival][key] for r in rounds
                  if r["designs"]["memascend"].get(key) and r["designs"][rival].get(key)]
        if ratios:
            name = key.removeprefix("steady_median_").removesuffix("_seconds")
            out[name] = {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios),
                         "max": max(ratios)}
    return out


def _cache_dir() -> str:
    path = Path(os.environ.get("MEMFIT_CACHE_DIR", Path.home() / ".cache" / "memfit")) / "finetune-swap"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


if __name__ == "__main__":
    preset_threads()
    main()
