"""The external reference for `--host-memory zero-infinity`: real DeepSpeed ZeRO-3 with NVMe offload of
parameters and optimizer states, on the same model shape, data, batch, sequence length and dtype.

    DS_ACCELERATOR=cpu python -m benchmarks.finetune_deepspeed --shape 0.1b --steps 3 --seq-len 256 \
        --nvme-dir /tmp/ds_swap --out benchmarks/results/finetune_deepspeed_0.1b.json

Needs `deepspeed` (pip) and, for its NVMe swapper, libaio's headers (Debian: libaio-dev); DeepSpeed builds its
async_io and cpu_adam ops on first use. The DeepSpeed config is the documented ZeRO-Infinity one with every
buffer setting at its default (offload_param/offload_optimizer to nvme, pin_memory true, aio defaults). Prints
peak RSS and step times; compare with benchmarks/finetune_offload.py's zero-infinity run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

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

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Wrapped()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    tok = Tokenizer(resolve_model_path("memfit-tiny"))
    examples, _ = build_examples(Path(args.data), tok, args.seq_len)
    losses, seconds = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids, labels = collate([examples[i] for i in batch_indices(len(examples), args.batch_size, step, args.seed)], 0)
        loss = engine(ids.to(engine.device), labels.to(engine.device))
        engine.backward(loss)
        engine.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"step {step}: loss {losses[-1]:.4f} in {seconds[-1]:.1f} s", flush=True, file=__import__("sys").stderr)
    result = {
        "benchmark": "finetune_deepspeed", "shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "steps": args.steps, "deepspeed": deepspeed.__version__, "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline, "step_seconds": seconds, "losses": losses, "ds_config": ds_config,
        **header(args.threads, args.seed, shared_machine=True),
    }
    emit(result, args.out)
    print(json.dumps({"peak_rss_mib": result["peak_rss_bytes"] >> 20}), file=__import__("sys").stderr)


if __name__ == "__main__":
    preset_threads()
    main()
