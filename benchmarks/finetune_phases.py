"""Where an offloaded fine-tuning run's peak RSS falls: the kernel's peak-RSS mark (VmHWM) read and reset around
each phase of the run.

    OMP_NUM_THREADS=2 python -m benchmarks.finetune_phases --shape 0.1b --design memascend --steps 2 \
        --seq-len 256 --threads 2 --ssd-dir /tmp/bench [--layers 2]

One process, the same configuration as a `benchmarks.finetune_offload` worker. Phases: the initial write of the
weights; per step each unit's forward, its recompute in the backward, the head (forward and backward at once),
the embedding's backward, each group's AdamW update (streamed designs run them inside the backward; a pipelined
update's last writes settled at the step's end and a group's first read started in the backward are phases of
their own), and what runs between them, named after the phase they follow. A phase's figure is the most RSS it reached, above the
process baseline the trainer reports; each phase's time (main thread, nested calls excluded) is recorded too.
`--layers N` keeps the shape's widths and vocabulary with N decoder layers: a cheap probe of the phases that do
not depend on depth (embedding, head, the updates of one layer). --json prints the one result object.

What reading the (V, C) matrix in row blocks costs in time (memascend's `vocab_blocks`: the head reads every
block twice, a pass for the log-sum-exp and one for the gradients), side by side in one process:

    OMP_NUM_THREADS=2 python -m benchmarks.finetune_phases --shape 0.1b --design memascend --steps 3 \
        --seq-len 256 --threads 2 --ssd-dir /tmp/bench --vocab-blocks both --reps 3

runs the probe `--reps` times with the flag on and off, alternating (on-off, off-on, ...), and reports per
variant the head's time (its forward + backward, and the wait for its weights before it), the embedding's
forward and the step, each the median over the reps of the steps that are neither the first (warm-up) nor,
with 3 or more steps, the last (the trainer runs it under its allocator profiler).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import emit, header, pin_threads, preset_threads
from benchmarks.finetune_offload import DATA, SHAPES, model_config


class PhaseMeter:
    """Attributes the process's peak RSS to the phase running in the main thread: each wrapped call ends the
    running segment (its VmHWM goes to the label on top of the stack) and starts its own."""

    def __init__(self) -> None:
        from memfit.memory.measure import peak_rss_bytes, reset_peak_rss

        self._hwm, self._reset = peak_rss_bytes, reset_peak_rss
        self.stack = ["setup (data, skeleton, pools)"]
        self.step = -1
        self.after_head = False
        self.peaks: dict[str, int] = {}  # label -> most RSS reached in it (bytes, absolute)
        self.seconds: dict[str, float] = {}  # label -> main-thread time in it, nested wrapped calls excluded
        self.order: list[str] = []
        self._since = time.perf_counter()
        self._wrapped: list[tuple[object, str, object]] = []  # (owner, name, original) for unwrap

    def close(self) -> None:
        label = self.stack[-1] if self.step < 0 else f"step {self.step}: {self.stack[-1]}"
        if label not in self.peaks:
            self.order.append(label)
        self.peaks[label] = max(self.peaks.get(label, 0), self._hwm())
        now = time.perf_counter()
        self.seconds[label] = self.seconds.get(label, 0.0) + now - self._since
        self._since = now
        self._reset()

    def wrap(self, owner: object, name: str, label: Callable[..., str]) -> None:
        fn = getattr(owner, name)
        own = vars(owner)  # the raw attribute (a function, not a bound method), when the owner itself has it
        self._wrapped.append((owner, name, own[name] if name in own else None))

        def inner(*args, **kwargs):
            self.close()
            own = label(*args, **kwargs)
            self.stack.append(own)
            try:
                return fn(*args, **kwargs)
            finally:
                self.close()
                self.stack.pop()
                # what the caller runs next is named after the phase it follows
                self.stack[-1] = f"{self.stack[-1].split(' (after ')[0]} (after {own})"

        setattr(owner, name, inner)

    def unwrap(self) -> None:
        """Put the wrapped functions back (latest first), so a second probe in the process wraps the originals."""
        while self._wrapped:
            owner, name, fn = self._wrapped.pop()
            if fn is None:  # inherited: drop the wrapper, the base's attribute shows through again
                delattr(owner, name)
            else:
                setattr(owner, name, fn)


def probe(args: argparse.Namespace, vocab_blocks: bool | None = None) -> dict:
    """One run under the meter; `vocab_blocks` set on the design's class for it (None: the design's own)."""
    pin_threads(args.threads)
    from memfit.train.finetune import executor, trainer
    from memfit.train.finetune.designs import make_design
    from memfit.train.finetune.store import GroupStore
    from memfit.train.finetune.units import UnitRunner

    meter = PhaseMeter()
    groups_of: dict[int, str] = {}

    def on_step(self, batch, loss_scale):
        meter.step += 1
        meter.after_head = False
        return "step start"

    def on_forward(self, k, weights, state, batch):
        return f"{'recompute' if meter.after_head else 'forward'} unit {k}"

    def on_head(self, *a, **k):
        meter.after_head = True
        return "head (forward + backward)"

    def on_update(self, gi, *a, **k):
        groups_of[gi] = self.groups[gi].name
        return f"update {self.groups[gi].name}"

    meter.wrap(trainer, "random_weights", lambda *a, **k: "initial write of the weights")
    meter.wrap(executor.StepExecutor, "step", on_step)
    meter.wrap(UnitRunner, "forward", on_forward)
    meter.wrap(UnitRunner, "head_step", on_head)
    meter.wrap(executor.StepExecutor, "_embedding_backward", lambda *a, **k: "embedding backward")
    meter.wrap(GroupStore, "update_group", on_update)
    # the update's waits outside a group's update (the trainer's optimizer_settle_seconds): a pipelined update's
    # last writes settled at the step's end, and a group's first read started during the backward
    meter.wrap(GroupStore, "settle_updates", lambda *a, **k: "update writes settled")
    meter.wrap(GroupStore, "prepare_update", lambda self, gi: f"update read-ahead {self.groups[gi].name}")
    shape = model_config(args.shape)
    if args.layers:
        shape = dataclasses.replace(shape, num_hidden_layers=args.layers)
    design = type(make_design(args.design))
    own_flag = vars(design).get("vocab_blocks")
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        if vocab_blocks is not None:
            design.vocab_blocks = vocab_blocks
        with tempfile.TemporaryDirectory(dir=args.ssd_dir) as swap:
            cfg = trainer.FinetuneConfig(model="memfit-tiny", data=args.data, offload="ssd", ssd_dir=swap,
                                         host_memory=args.design, steps=args.steps, seq_len=args.seq_len, lr=1e-5,
                                         seed=args.seed, model_config=shape, grad_checkpointing="device",
                                         mmap_threshold=trainer.MMAP_THRESHOLD)
            r = trainer.run(cfg).to_json()
    finally:
        meter.close()
        meter.unwrap()
        if own_flag is not None:
            design.vocab_blocks = own_flag
        elif "vocab_blocks" in vars(design):  # set above on a class that inherits the flag: inherit it again
            delattr(design, "vocab_blocks")
    base = r["host_memory"]["baseline_rss_bytes"]
    phases = [{"phase": p, "peak_above_baseline_mib": round((meter.peaks[p] - base) / 2**20, 1),
               "seconds": round(meter.seconds[p], 3)} for p in meter.order]
    # the head's own phase, the wait for its weights just before it, and the embedding's forward, per step
    head = [{"head_seconds": meter.seconds.get(f"step {s}: head (forward + backward)", 0.0),
             "head_wait_seconds": meter.seconds.get(f"step {s}: step start (after forward unit {shape.num_hidden_layers})", 0.0),
             "embed_forward_seconds": meter.seconds.get(f"step {s}: forward unit 0", 0.0)} for s in range(args.steps)]
    top = max(phases, key=lambda p: p["peak_above_baseline_mib"])
    # the trainer's own peak_rss_bytes reads VmHWM since this meter's last reset: the run's peak is the phases' max
    peak = max(meter.peaks.values())
    return {"benchmark": "finetune_phases", "shape": args.shape, "layers": shape.num_hidden_layers,
            "design": args.design, "steps": args.steps, "seq_len": args.seq_len,
            "peak_rss_bytes": peak, "baseline_rss_bytes": base,
            "baseline_rss_split_bytes": r["host_memory"].get("baseline_rss_split_bytes"),
            "peak_above_baseline_mib": round((peak - base) / 2**20, 1), "peak_phase": top,
            "pools": r["host_memory"]["pools"], "losses": r["losses"], "step_seconds": r["step_seconds"],
            "vocab_blocks": design.vocab_blocks if vocab_blocks is None else vocab_blocks, "head": head,
            "load_before": load, "load_after": [round(x, 2) for x in os.getloadavg()],
            "phases": phases, **header(args.threads, args.seed, shared_machine=True)}


def timed_steps(steps: int) -> list[int]:
    """The steps to time: not the first (warm-up: the pools' page faults), nor, with 3 or more, the last (the
    trainer runs it under its allocator profiler)."""
    return list(range(1, steps - 1)) if steps >= 3 else list(range(min(1, steps - 1), steps))


def compare(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Medians over reps x timed steps per variant ("on", "off"), and on / off."""
    timed = timed_steps(args.steps)
    out: dict = {"benchmark": "finetune_phases", "mode": "vocab_blocks on against off", "shape": args.shape,
                 "design": args.design, "steps": args.steps, "seq_len": args.seq_len, "reps": args.reps,
                 "timed_steps": timed, "variants": {}}
    for name, reps in runs.items():
        rows = [dict(r["head"][s], step_seconds=r["step_seconds"][s]) for r in reps for s in timed]
        median = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        median["head_with_wait_seconds"] = statistics.median(
            row["head_seconds"] + row["head_wait_seconds"] for row in rows)
        out["layers"] = reps[0]["layers"]
        out["variants"][name] = {"median": median, "reps": [
            {k: r[k] for k in ("head", "step_seconds", "losses", "pools", "peak_above_baseline_mib", "load_before",
                               "load_after")} for r in reps]}
    on, off = out["variants"]["on"]["median"], out["variants"]["off"]["median"]
    out["on_over_off"] = {k: on[k] / off[k] if off[k] else None for k in on}
    return {**out, **header(args.threads, args.seed, shared_machine=True)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own)")
    p.add_argument("--design", default="memascend")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ssd-dir", required=True)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab-blocks", default="design", choices=("design", "on", "off", "both"),
                   help="memascend's vocab_blocks for the run (both: --reps runs of each, alternating, compared)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", action="store_true", help="no table on stderr (stdout is the JSON object either way)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.layers < 0 or args.steps < 1 or args.reps < 1:
        p.error("--layers must be >= 0, --steps and --reps >= 1")
    if args.vocab_blocks in ("on", "both") and args.design != "memascend":
        p.error("vocab_blocks needs memascend's block pool: --design memascend")
    if args.vocab_blocks == "both":
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for i in range(args.reps):  # alternating, so a drift in the machine's load falls on both
            for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                print(f"rep {i + 1}/{args.reps}: vocab_blocks {name} ...", file=sys.stderr, flush=True)
                runs[name].append(probe(args, name == "on"))
        result = compare(runs, args)
        if not args.json:
            for name, v in result["variants"].items():
                print(f"vocab_blocks {name}: " + ", ".join(f"{k} {x:.3f}" for k, x in v["median"].items()),
                      file=sys.stderr)
        emit(result, args.out, None)
        return
    result = probe(args, None if args.vocab_blocks == "design" else args.vocab_blocks == "on")
    if not args.json:  # the table on stderr; stdout keeps the one JSON object either way
        for ph in result["phases"]:
            print(f"{ph['peak_above_baseline_mib']:8.1f}  {ph['seconds']:8.3f}  {ph['phase']}", file=sys.stderr)
    emit(result, args.out, None)


if __name__ == "__main__":
    preset_threads()
    main()
