"""`memfit train finetune`: full fine-tuning of a Llama-family model with its state offloaded.

The run: read and tokenize the data; build the model skeleton on the meta device and cut it into swap
groups; check the host-memory plan against --memory-budget; place fp32 masters, Adam moments and compute
copies in the chosen tier through the chosen host-memory design; then per step: the layer-wise forward and
backward (executor.py), the overflow check on the gradient buffer, AdamW group by group (or a skipped
step and a smaller loss scale on overflow), and a checkpoint every --save-every steps and at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memfit.llm.models import ModelConfig, parse_dtype
from memfit.llm.models.loader import resolve_model_path
from memfit.llm.models.tokenizer import Tokenizer
from memfit.memory.allocator import AllocatorMeter
from memfit.memory.budget import available_memory
from memfit.memory.heap import MMAP_THRESHOLD_MAX, fix_mmap_threshold

MMAP_THRESHOLD = 1 << 20  # what the entry points fix glibc's mmap threshold at (FinetuneConfig.mmap_threshold)
from memfit.memory.measure import peak_rss_bytes, reset_peak_rss, rss_bytes, status_bytes
from memfit.train.finetune import budget as budget_mod
from memfit.train.finetune.checkpoint import load_checkpoint, save_checkpoint
from memfit.train.finetune.data import batch_indices, build_examples, collate
from memfit.train.finetune.designs import make_design
from memfit.train.finetune.executor import StepConfig, StepExecutor
from memfit.train.finetune.gradients import blockwise_groups, streamed_layout, streams
from memfit.train.finetune.optim import AdamW, LossScaler
from memfit.train.finetune.placement import Placement, PlacementConfig, placement_report
from memfit.train.finetune.store import TIERS, GroupStore, placed_items
from memfit.train.finetune.units import Batch, UnitRunner, loss_chunk_tokens, make_groups, skeleton, unit_groups
from memfit.train.finetune.weights import WeightsError, load_weights, random_weights

log = logging.getLogger(__name__)
Progress = Callable[[int, int, float], None]  # (steps done, steps in all, last loss)


class FinetuneError(ValueError):
    """Bad settings for a fine-tuning run; the message says what to change."""


@dataclass
class FinetuneConfig:
    model: str  # model directory or bundled name (weights and tokenizer)
    data: str
    offload: str = "none"  # none | host | ssd
    ssd_dir: str | None = None
    host_memory: str = "memascend"  # zero-infinity | zero-infinity-tuned | zero-infinity-pipelined | memascend
    memory_budget: int | None = None  # bytes of host memory the plan may take
    steps: int = 10
    batch_size: int = 1
    seq_len: int = 512
    lr: float = 1e-5
    weight_decay: float = 0.0
    dtype: str = "bfloat16"  # compute dtype: bfloat16 | float16 | float32
    grad_checkpointing: str | None = None  # None | "device" | "host"
    prefetch_depth: int = 2
    loss_chunk_tokens: int | None = None  # tokens per chunk of the head's logits (None: ~16 MiB of temporaries)
    save: str | None = None
    save_every: int = 0
    resume: str | None = None
    seed: int = 0
    device: str = "cpu"
    model_config: ModelConfig | None = None  # set: random-initialised weights of these shapes (benchmarks)
    placement: PlacementConfig | None = None  # None: the design's own host allocations (no NUMA policy)
    # glibc: blocks of at least this many bytes are their own mappings, returned to the system when freed
    # (memory.heap.fix_mmap_threshold), for every design; None keeps glibc's policy, under which the head's
    # logits and the optimizer's chunks stayed in the heap step after step (0.1B: ~45 MiB more at the peak).
    # It holds for the rest of the process, so the process's entry point opts in (`memfit train finetune` and the
    # benchmark workers pass MMAP_THRESHOLD); a library call leaves the caller's malloc policy alone.
    mmap_threshold: int | None = None

    def validate(self) -> None:
        if self.mmap_threshold is not None and not 0 < self.mmap_threshold <= MMAP_THRESHOLD_MAX:
            raise FinetuneError(f"mmap_threshold must be 1..{MMAP_THRESHOLD_MAX} bytes (glibc's limit; got "
                                f"{self.mmap_threshold})")
        if self.offload not in TIERS:
            raise FinetuneError(f"--offload must be none, host or ssd (got {self.offload!r})")
        if self.offload == "ssd" and not self.ssd_dir:
            raise FinetuneError("--offload ssd needs --ssd-dir DIR: a directory on an SSD with room for the state")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise FinetuneError(f"--loss-chunk-tokens must be at least 1 (got {self.loss_chunk_tokens})")
        for name in ("save_every", "prefetch_depth"):
            if getattr(self, name) < 0:
                flag = "--prefetch" if name == "prefetch_depth" else "--save-every"
                raise FinetuneError(f"{flag} must be >= 0 (got {getattr(self, name)})")
        if self.save_every and not self.save:
            raise FinetuneError("--save-every needs --save DIR")
        if not self.lr > 0 or math.isinf(self.lr):  # also NaN, which AdamW would take and turn every weight into
            raise FinetuneError(f"--lr must be a positive number (got {self.lr})")
        if not 0 <= self.weight_decay < math.inf:
            raise FinetuneError(f"--weight-decay must be a number >= 0 (got {self.weight_decay})")
        if self.placement is not None:
            self.placement.validate()
            if self.offload == "ssd" or (self.offload == "none" and self.device != "cpu"):
                raise FinetuneError("--placement places state held in host memory: use --offload host, or "
                                    "--offload none on a CPU device")
        if self.grad_checkpointing not in (None, "device", "host"):
            raise FinetuneError("--grad-checkpointing takes no value or 'host'")
        try:
            parse_dtype(self.dtype)
        except ValueError as exc:
            raise FinetuneError(f"--dtype: {exc}") from None

    @property
    def recompute(self) -> bool:
        # Offloaded weights can't stay referenced by a whole-model autograd graph: offload implies recompute.
        return self.offload != "none" or self.grad_checkpointing is not None


@dataclass
class FinetuneResult:
    losses: list[float]
    start_step: int
    step_seconds: list[float]
    peak_rss_bytes: int
    host_memory: dict[str, Any]
    data: dict[str, Any]
    ssd: dict[str, Any]
    skipped_steps: list[int]
    loss_scale: float
    checkpoint: str | None
    all_losses: list[float] = field(default_factory=list)  # from step 0 (history of a resumed run included)
    # the optimizer update's part of each step (store.update_seconds): AdamW and the waits for its SSD transfers,
    # those a pipelined update leaves in flight and waits for at the step's end included
    optimizer_seconds: list[float] = field(default_factory=list)
    placement: dict[str, Any] | None = None  # where each group landed (--placement)
    # the tensor allocator's peak within the run's last step, above what was allocated when it began
    # (memfit.memory.allocator: the CPU profiler's allocation events; CUDA's max_memory_allocated)
    allocator_peak_bytes: int = 0
    # the process's CPU time (every thread: compute, prefetch, aio) per step: beside step_seconds, what a step
    # costs on a machine others load (wall time there includes waiting for a core)
    step_cpu_seconds: list[float] = field(default_factory=list)
    # of optimizer_seconds, the waits outside the group updates (store.update_settle_seconds): what a pipelined
    # update did not hide behind the backward (its last writes, settled at the step's end)
    optimizer_settle_seconds: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["median_step_seconds"] = statistics.median(self.step_seconds) if self.step_seconds else None
        out["median_optimizer_seconds"] = statistics.median(self.optimizer_seconds) if self.optimizer_seconds else None
        return out


def run(cfg: FinetuneConfig, progress: Progress | None = None) -> FinetuneResult:
    cfg.validate()
    fixed = fix_mmap_threshold(cfg.mmap_threshold) if cfg.mmap_threshold is not None else False
    reset_peak_rss()
    baseline = rss_bytes()  # the process before this run: interpreter, torch, memfit
    # its split: anonymous pages, and file-backed ones (the libraries' pages mapped so far), which moved by
    # ~195 MiB between two runs of the same code on one host (docs/finetune.md)
    status = status_bytes()
    baseline_split = {"anon": status.get("RssAnon"), "file": status.get("RssFile")}
    device = torch.device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    model_path = resolve_model_path(cfg.model)
    model_cfg = cfg.model_config or ModelConfig.from_dir(model_path)
    tok = Tokenizer(model_path)
    if tok.vocab_size > model_cfg.vocab_size:
        raise FinetuneError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model_cfg.vocab_size}")
    examples, data_stats = build_examples(Path(cfg.data), tok, cfg.seq_len)
    if data_stats.malformed:
        log.warning("%s: skipped %d malformed record(s), e.g. %s", cfg.data, data_stats.malformed,
                    "; ".join(data_stats.malformed_where[:3]))
    if data_stats.no_assistant_after_truncation:
        log.warning("skipped %d example(s) left without an assistant token at --seq-len %d",
                    data_stats.no_assistant_after_truncation, cfg.seq_len)

    model, groups, units, design, in_flight, streamed, plan = _layout(cfg, model_cfg, dtype)
    budget_mod.check_budget(plan, cfg.memory_budget, available_memory() if device.type == "cpu" else None)

    placement = None
    if cfg.placement is not None:
        placement = Placement(cfg.placement, placed_items(groups, dtype), pin=device.type == "cuda")
    store = GroupStore(groups, cfg.offload, design, dtype, device, Path(cfg.ssd_dir) if cfg.ssd_dir else None,
                       in_flight, placement, streamed)
    try:
        result = _train(cfg, model, groups, units, store, examples, data_stats, tok, model_cfg, model_path, plan,
                        progress, baseline)
        result.host_memory["baseline_rss_split_bytes"] = baseline_split
        result.host_memory["mmap_threshold"] = cfg.mmap_threshold if fixed else None  # None: glibc's own policy
        return result
    finally:
        store.close()


def _layout(cfg: FinetuneConfig, model_cfg: ModelConfig, dtype: torch.dtype) -> tuple:
    """The run's skeleton (meta tensors), groups, units, design, units in flight, streamed-gradient layout and
    host-memory plan (budget.py): everything decided before a byte is allocated."""
    model = skeleton(model_cfg)
    groups = make_groups(model)
    units = unit_groups(groups, model_cfg.tie_word_embeddings)
    design = make_design(cfg.host_memory)
    in_flight = cfg.prefetch_depth + 2  # units in flight + the embedding a tied head reads
    loss_chunk = cfg.loss_chunk_tokens or loss_chunk_tokens(model_cfg.vocab_size)
    streamed = None
    if streams(design.stream_gradients, cfg.offload, dtype, cfg.placement is not None):
        blockwise = (blockwise_groups(groups, model_cfg.tie_word_embeddings, cfg.batch_size * cfg.seq_len,
                                      dtype.itemsize) if design.blockwise_gradients else frozenset())
        streamed = streamed_layout(groups, units, blockwise, design.optimizer_piece(groups))
    plan = budget_mod.plan(groups, model_cfg, cfg.offload, design, dtype, cfg.batch_size, cfg.seq_len, in_flight,
                           cfg.recompute, loss_chunk, streamed)
    return model, groups, units, design, in_flight, streamed, plan


def plan_host_memory(cfg: FinetuneConfig) -> budget_mod.Plan:
    """The host-memory plan `run(cfg)` checks --memory-budget against, pool by pool, without running anything: what a
    design would need for a model too large to try on this machine."""
    cfg.validate()  # what run() would refuse is not planned either
    model_cfg = cfg.model_config or ModelConfig.from_dir(resolve_model_path(cfg.model))
    return _layout(cfg, model_cfg, parse_dtype(cfg.dtype))[-1]


def _train(cfg, model, groups, units, store, examples, data_stats, tok, model_cfg, model_path, plan,
           progress, baseline: int) -> FinetuneResult:
    dtype = parse_dtype(cfg.dtype)
    scaler = LossScaler.for_dtype(dtype)
    adam = AdamW(lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, adam_step, history = 0, 0, []
    if cfg.resume:
        state = load_checkpoint(Path(cfg.resume), store, groups, model_cfg)
        start, adam_step, history = state["step"], state["adam_step"], state["losses"]
        scaler = LossScaler(**state["loss_scaler"])
    elif cfg.model_config is not None:
        random_weights(groups, store, cfg.seed)  # a piece at a time (weights.LlamaInit)
    else:
        try:
            load_weights(model_path, groups, store)
        except WeightsError as exc:
            raise FinetuneError(str(exc)) from None
    executor = StepExecutor(UnitRunner(model, cfg.loss_chunk_tokens), groups, units, store,
                            StepConfig(cfg.recompute, cfg.grad_checkpointing == "host", cfg.prefetch_depth,
                                       store.design.vocab_blocks))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses, seconds, cpu_seconds, opt_seconds, settle_seconds, skipped, ckpt = [], [], [], [], [], [], None
    checkpoint_peak = allocator_peak = 0
    for step in range(start, cfg.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        ids, labels = collate([examples[i] for i in batch_indices(len(examples), cfg.batch_size, step, cfg.seed)], pad)
        # the last step runs under the allocator meter (its profiler costs a little time: one step, not all)
        metered = step == cfg.steps - 1
        with AllocatorMeter(store.device) if metered else contextlib.nullcontext() as allocator:
            store.zero_grad()
            if store.placement is not None:
                store.placement.new_step()
            if store.streamed is not None:  # AdamW runs group by group inside the backward (store.grad_done)
                adam_step += 1
                store.stream_updates(adam, adam_step, scaler.scale)
            loss = executor.step(Batch.make(ids, labels, model, store.device), scaler.scale)
            checkpoint_peak = max(checkpoint_peak, executor.checkpoint_bytes)
            # fp16 only (a dynamic loss scale): bf16 and fp32 share fp32's range, and DeepSpeed's ZeRO-3 checks
            # only when its dtype is float16 (stage3.py _overflow_check_and_loss_scale_update)
            overflow = scaler.dynamic and store.design.has_overflow(store.grad_buffer)
            if overflow and store.streamed is None:
                skipped.append(step)
                log.warning("step %d: non-finite gradients; step skipped (loss scale %g)", step, scaler.scale)
            else:
                if store.streamed is None:
                    adam_step += 1
                    store.optimizer_step(adam, adam_step, scaler.scale)
                # streamed: the updates inside the backward, and the wait for their last writes at its end
                opt_seconds.append(store.update_seconds)
                settle_seconds.append(store.update_settle_seconds)
        if metered:
            allocator_peak = allocator.peak_bytes
        scaler.update(overflow)
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
        losses.append(loss)
        if progress:
            progress(step + 1, cfg.steps, loss)
        done = step + 1
        if cfg.save and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
            ckpt = save_checkpoint(Path(cfg.save), done, store, groups, model_cfg, model_path, {
                "adam_step": adam_step, "losses": history + losses, "loss_scaler": dataclasses.asdict(scaler),
                "seed": cfg.seed, "data": cfg.data, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            })
    peak = peak_rss_bytes()
    pools = dict(store.pools)
    pools["activation checkpoints (measured)"] = checkpoint_peak
    host = {"design": cfg.host_memory, "tier": cfg.offload, "pools": pools, "planned": plan.pools,
            "baseline_rss_bytes": baseline, "rss_now_bytes": rss_bytes(),
            # what the peak holds beyond the baseline and the pools: compute temporaries, allocator slack
            "other_bytes": max(peak - baseline - sum(pools.values()), 0)}
    return FinetuneResult(losses, start, seconds, peak, host, data_stats.to_json(), store.io_stats(), skipped,
                          scaler.scale, str(ckpt) if ckpt else None, history + losses, opt_seconds,
                          placement_report(store.placement, [g.numel for g in groups],
                                           store.itemsize if store.separate_copy else 0, cfg.recompute, seconds,
                                           opt_seconds), allocator_peak, cpu_seconds, settle_seconds)
