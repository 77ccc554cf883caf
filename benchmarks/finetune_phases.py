"""Where an offloaded fine-tuning run's peak RSS falls: the kernel's peak-RSS mark (VmHWM) read and reset around
each phase of the run.

    OMP_NUM_THREADS=2 python -m benchmarks.finetune_phases --shape 0.1b --design memascend --steps 2 \
        --seq-len 256 --threads 2 --ssd-dir /tmp/bench [--layers 2]

One process, the same configuration as a `benchmarks.finetune_offload` worker. Phases: the initial write of the
weights; per step each unit's forward, its recompute in the backward, the head (forward and backward at once),
the embedding's backward, each group's AdamW update (streamed designs run them inside the backward), and what
runs between them, named after the phase they follow. A phase's figure is the most RSS it reached, above the
process baseline the trainer reports. `--layers N` keeps the shape's widths and vocabulary with N decoder
layers: a cheap probe of the phases that do not depend on depth (embedding, head, the updates of one layer).
--json prints the one result object.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
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
        self.order: list[str] = []

    def close(self) -> None:
        label = self.stack[-1] if self.step < 0 else f"step {self.step}: {self.stack[-1]}"
        if label not in self.peaks:
            self.order.append(label)
        self.peaks[label] = max(self.peaks.get(label, 0), self._hwm())
        self._reset()

    def wrap(self, owner: object, name: str, label: Callable[..., str]) -> None:
        fn = getattr(owner, name)

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


def probe(args: argparse.Namespace) -> dict:
    pin_threads(args.threads)
    from memfit.train.finetune import executor, trainer
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
    shape = model_config(args.shape)
    if args.layers:
        shape = dataclasses.replace(shape, num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory(dir=args.ssd_dir) as swap:
        cfg = trainer.FinetuneConfig(model="memfit-tiny", data=args.data, offload="ssd", ssd_dir=swap,
                                     host_memory=args.design, steps=args.steps, seq_len=args.seq_len, lr=1e-5,
                                     seed=args.seed, model_config=shape, grad_checkpointing="device",
                                     mmap_threshold=trainer.MMAP_THRESHOLD)
        r = trainer.run(cfg).to_json()
    meter.close()
    base = r["host_memory"]["baseline_rss_bytes"]
    phases = [{"phase": p, "peak_above_baseline_mib": round((meter.peaks[p] - base) / 2**20, 1)} for p in meter.order]
    top = max(phases, key=lambda p: p["peak_above_baseline_mib"])
    # the trainer's own peak_rss_bytes reads VmHWM since this meter's last reset: the run's peak is the phases' max
    peak = max(meter.peaks.values())
    return {"benchmark": "finetune_phases", "shape": args.shape, "layers": shape.num_hidden_layers,
            "design": args.design, "steps": args.steps, "seq_len": args.seq_len,
            "peak_rss_bytes": peak, "baseline_rss_bytes": base,
            "baseline_rss_split_bytes": r["host_memory"].get("baseline_rss_split_bytes"),
            "peak_above_baseline_mib": round((peak - base) / 2**20, 1), "peak_phase": top,
            "pools": r["host_memory"]["pools"], "losses": r["losses"], "step_seconds": r["step_seconds"],
            "phases": phases, **header(args.threads, args.seed, shared_machine=True)}


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
    p.add_argument("--json", action="store_true", help="no table on stderr (stdout is the JSON object either way)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.layers < 0 or args.steps < 1:
        p.error("--layers must be >= 0 and --steps >= 1")
    result = probe(args)
    if not args.json:  # the table on stderr; stdout keeps the one JSON object either way
        for ph in result["phases"]:
            print(f"{ph['peak_above_baseline_mib']:8.1f}  {ph['phase']}", file=sys.stderr)
    emit(result, args.out, None)


if __name__ == "__main__":
    preset_threads()
    main()
