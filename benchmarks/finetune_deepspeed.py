"""The external reference for `--host-memory zero-infinity`: real DeepSpeed ZeRO-3 with NVMe offload of
parameters and optimizer states, on the same model shape, data, batch, sequence length and dtype.

    DS_ACCELERATOR=cpu python -m benchmarks.finetune_deepspeed --shape 0.1b --steps 3 --seq-len 256 \
        --nvme-dir /tmp/ds_swap --out benchmarks/results/finetune_deepspeed_0.1b.json

Needs `deepspeed` (pip) and, for its NVMe swapper, libaio's headers (Debian: libaio-dev); DeepSpeed builds its
async_io and cpu_adam ops on first use. The DeepSpeed config is the documented ZeRO-Infinity one with every
buffer setting at its default (offload_param/offload_optimizer to nvme, pin_memory true, aio defaults). Prints
peak RSS and step times; compare with benchmarks/finetune_offload.py's zero-infinity run.

Options that make the run like for like with memfit's (they change the benchmark, not DeepSpeed's settings):
`--checkpoint-layers` recomputes each decoder layer in the backward (torch.utils.checkpoint, non-reentrant),
as memfit's offloaded trainer does per unit; `--memfit-init` fills the weights with memfit's
`init_group` values (normal 0.02, same generator order), so the losses are comparable. `--breakdown`
reports DeepSpeed's host buffers (benchmarks/deepspeed_probe.py) and the RSS after each phase.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time
from pathlib import Path

from benchmarks import deepspeed_probe as probe
from benchmarks.common import emit, header, preset_threads
from benchmarks.finetune_offload import DATA, SHAPES, model_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.1b", choices=sorted(SHAPES))
    p.add_argument("--nvme-dir", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=None)
    p.add_argument("--checkpoint-layers", action="store_true", help="recompute each decoder layer in the backward")
    p.add_argument("--memfit-init", action="store_true", help="memfit's random init (same values as its trainer)")
    p.add_argument("--breakdown", action="store_true", help="report DeepSpeed's host buffers and RSS by phase")
    args = p.parse_args(argv)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    import deepspeed
    import torch
    import torch.nn.functional as F

    from memfit.llm.models import build_model
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.tokenizer import Tokenizer
    from memfit.memory.measure import peak_rss_bytes, reset_peak_rss, rss_bytes
    from memfit.train.finetune.data import IGNORE, batch_indices, build_examples, collate

    torch.set_num_threads(args.threads)
    reset_peak_rss()
    baseline = rss_bytes()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = model_config(args.shape)
    nvme = str(Path(args.nvme_dir).resolve())
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme},
        },
    }

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = build_model(cfg)

        def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = self.lm.dense_logits(ids)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE)

    phases: list[dict] = []
    tracker = None

    def phase(name: str, **extra) -> None:
        if args.breakdown:  # the peak so far (kept across the tracker's resets)
            peak = max(tracker.overall, peak_rss_bytes()) if tracker is not None else peak_rss_bytes()
            phases.append({"phase": name, "rss_bytes": rss_bytes(), "peak_rss_bytes": peak, **extra})

    phase("start")
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Wrapped()
    if args.memfit_init:
        _memfit_init(model.lm, cfg, args.seed)
    if args.checkpoint_layers:
        _checkpoint_layers(model.lm)
    phase("model built (zero.Init)")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    phase("deepspeed.initialize")
    pools = probe.host_pools(engine, model) if args.breakdown else {}
    tracker = probe.PeakTracker() if args.breakdown else None
    if tracker is not None:  # the transient above the RSS at entry of each phase of a step
        opt = engine.optimizer
        tracker.wrap(engine, ["forward", "backward"])
        tracker.wrap(opt, ["_finalize_offload_gradient_accumulation", "_get_norm_groups", "_prepare_sub_group",
                           "unscale_and_clip_grads", "_optimizer_step", "_reassign_or_swap_out_partitioned_parameters",
                           "_release_sub_group", "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"])
    tok = Tokenizer(resolve_model_path("memfit-tiny"))
    examples, _ = build_examples(Path(args.data), tok, args.seq_len)
    losses, seconds = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids, labels = collate([examples[i] for i in batch_indices(len(examples), args.batch_size, step, args.seed)], 0)
        record: dict = {}
        with probe.saved_tensor_meter(record) if args.breakdown else contextlib.nullcontext():
            loss = engine(ids.to(engine.device), labels.to(engine.device))
        phase(f"step {step} forward", **record)
        if step == args.steps - 1 and args.breakdown:
            pools_after_forward = probe.host_pools(engine, model)
        engine.backward(loss)
        phase(f"step {step} backward")
        if step == args.steps - 1 and args.breakdown:
            pools_after_backward = probe.host_pools(engine, model)
        engine.step()
        phase(f"step {step} optimizer step")
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"step {step}: loss {losses[-1]:.4f} in {seconds[-1]:.1f} s", flush=True, file=__import__("sys").stderr)
    result = {
        "benchmark": "finetune_deepspeed", "shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "steps": args.steps, "deepspeed": deepspeed.__version__,
        "peak_rss_bytes": tracker.peak() if tracker is not None else peak_rss_bytes(),
        "checkpoint_layers": args.checkpoint_layers, "memfit_init": args.memfit_init,
        "baseline_rss_bytes": baseline, "step_seconds": seconds, "losses": losses, "ds_config": ds_config,
        **header(args.threads, args.seed, shared_machine=True),
    }
    if args.breakdown:
        result["breakdown"] = {"after_initialize": pools, "after_last_forward": pools_after_forward,
                               "after_last_backward": pools_after_backward,
                               "after_last_step": probe.host_pools(engine, model), "phases": phases,
                               "transient_above_entry_bytes": tracker.transients}
    emit(result, args.out)
    print(json.dumps({"peak_rss_mib": result["peak_rss_bytes"] >> 20}), file=__import__("sys").stderr)


def _memfit_init(lm, cfg, seed: int) -> None:
    """The values memfit's trainer starts from (memfit.train.finetune.weights.init_group: one generator,
    groups in forward order, normal(0, 0.02), norms one), written into the partitioned parameters a few at
    a time (GatheredParameters gathers, lets rank 0 write, and re-partitions on exit)."""
    import deepspeed
    import torch

    from memfit.train.finetune.weights import init_group
    from memfit.train.finetune.units import make_groups, skeleton

    named = dict(lm.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    for g in make_groups(skeleton(cfg)):
        _, views = init_group(g, gen)
        names = list(views)
        for i in range(0, len(names), 4):  # each parameter swapped in takes one of the 5 param swap buffers
            batch = names[i : i + 4]
            with deepspeed.zero.GatheredParameters([named[n] for n in batch], modifier_rank=0), torch.no_grad():
                for name in batch:
                    named[name].data.copy_(views[name])


def _checkpoint_layers(lm) -> None:
    """Recompute each decoder layer in the backward: only its inputs stay saved (memfit's per-unit recompute)."""
    from torch.utils.checkpoint import checkpoint

    for layer in lm.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


if __name__ == "__main__":
    preset_threads()
    main()
