"""One rank's shard of a Llama-family model, read straight from safetensors, and the collectives that join shards.

Megatron-style split of each decoder layer over N ranks (rank r holds block r of N along the split dimension):
- q/k/v_proj and gate/up_proj: column-parallel (output rows split), so rank r computes heads
  [r*H/N, (r+1)*H/N) and KV heads [r*Hkv/N, (r+1)*Hkv/N) and intermediate columns I/N; attention needs
  nothing from other ranks, and its KV cache holds only those Hkv/N heads (the cache shrinks by N too);
- o_proj and down_proj: row-parallel (input columns split): each rank's product is a partial sum of the full
  output, summed by one all-reduce per projection (2 per layer). A bias is added on rank 0 only.
- embed_tokens and lm_head: vocab-parallel (rows split, the vocabulary padded up to a multiple of N). The
  embedding's lookup is zero outside the rank's rows and an all-reduce of (T, C) completes it; the head's
  (S, V/N) logits are all-gathered to (S, V) on every rank. Replicating them instead would keep 2 x V x C
  (V x C tied) on every rank: for Qwen2.5-0.5B, 136M of its 494M parameters (a third of the weights on every
  rank); the all-gather moves S x V floats a step, a few hundred KiB at batch 32, against the matmuls' MiBs.
- norms are replicated (C floats each).

Each rank reads only its slice of every tensor (safetensors `get_slice`), so per-rank weight memory is ~1/N.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from memfit.llm.models import LlamaForCausalLM, ModelConfig, ModelFormatError, build_model, parse_dtype
from memfit.llm.models.loader import _SkipWeightInit, resolve_model_path, weight_files
from memfit.llm.parallel.group import TPGroup

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split
ROW = ("o_proj", "down_proj")  # input columns split, outputs all-reduced
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


class ShardingError(ValueError):
    """The model cannot be split this many ways."""


def check_divisible(model: str | Path | ModelConfig, world: int) -> ModelConfig:
    """Refuse a tensor-parallel size that does not divide the heads, the KV heads or the MLP width."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ShardingError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dir(resolve_model_path(model))
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(cfg, name)
        if value % world:
            raise ShardingError(
                f"--tensor-parallel-size {world} does not divide the model's {name} ({value}): every rank must "
                f"hold the same number of heads and MLP columns; use a size that divides {value}")
    return cfg


def padded_vocab(vocab: int, world: int) -> int:
    """Vocabulary rows per rank: V padded up to a multiple of N, then split."""
    return -(-vocab // world)


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config one rank's modules are built with: H/N heads, Hkv/N KV heads, I/N MLP columns, V/N vocabulary
    rows. Its KV bytes per token and weight bytes are one rank's (what `memfit fit` and the ledger count)."""
    check_divisible(cfg, world)
    if world == 1:
        return cfg
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                               num_key_value_heads=cfg.num_key_value_heads // world,
                               intermediate_size=cfg.intermediate_size // world,
                               vocab_size=padded_vocab(cfg.vocab_size, world))


def _slice_of(name: str, f, rank: int, world: int, vocab: int) -> torch.Tensor:
    """Rank `rank`'s block of tensor `name`, reading only that block from the file."""
    sl = f.get_slice(name)
    shape = sl.get_shape()
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    if name in VOCAB:  # rows [r*Vp, (r+1)*Vp) of V, zero rows past V
        vp = padded_vocab(vocab, world)
        lo, hi = rank * vp, min((rank + 1) * vp, vocab)
        part = sl[lo:hi] if hi > lo else torch.zeros(0, shape[1])
        if part.shape[0] < vp:
            part = torch.cat([part, torch.zeros(vp - part.shape[0], shape[1], dtype=part.dtype)])
        return part
    if leaf in COLUMN:  # weight (out, in) or bias (out,): rows split
        n = shape[0] // world
        return sl[rank * n:(rank + 1) * n]
    if leaf in ROW:
        if name.endswith(".bias"):  # added once, after the all-reduce
            t = sl[:]
            return t if rank == 0 else torch.zeros_like(t)
        n = shape[1] // world
        return sl[:, rank * n:(rank + 1) * n]
    return sl[:]  # norms: replicated


def load_shard(path: str | Path, dtype: str | torch.dtype | None, device: torch.device | str, rank: int,
               world: int) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Rank `rank`'s shard of the model at `path`; returns (shard model, the *full* model's config)."""
    from safetensors import safe_open

    path = resolve_model_path(path)
    full = ModelConfig.from_dir(path)
    target = parse_dtype(dtype) if dtype is not None else parse_dtype(full.torch_dtype)
    full = dataclasses.replace(full, torch_dtype=str(target).removeprefix("torch."))
    cfg = shard_config(full, world)
    device = torch.device(device)
    with torch.device("meta"), _SkipWeightInit():
        model = build_model(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                if name not in expected:
                    continue  # load_model (rank 0's checks) reports unknown tensors; a shard only takes its own
                t = _slice_of(name, f, rank, world, full.vocab_size)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ModelFormatError(f"tensor {name!r} in {file.name}: rank {rank}'s slice has shape "
                                           f"{list(t.shape)}, the sharded config implies {list(expected[name].shape)}")
                state[name] = t.to(device=device, dtype=target)
    missing = [n for n in expected if n not in state]
    if missing:
        raise ModelFormatError(f"checkpoint in {path} lacks weight(s): {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval(), full


class AllReduceOutput(nn.Module):
    """A row-parallel projection: this rank's partial product (N, C), summed over the ranks."""

    def __init__(self, inner: nn.Module, group: TPGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.inner(x).contiguous())  # (N, C)


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, lo + Vp) of the embedding; tokens outside them look up zeros, and the all-reduce fills them in.
    `inner` is whatever the backends made of the embedding (an nn.Embedding, or kernels/blocked.py's
    BlockedEmbedding reading a tied head's packed rows): it is only ever called, never unpacked."""

    def __init__(self, inner: nn.Module, rank: int, group: TPGroup) -> None:
        super().__init__()
        self.inner = inner
        self.rows = inner.num_embeddings  # Vp
        self.lo = rank * self.rows
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo  # (N,)
        outside = (local < 0) | (local >= self.rows)
        out = self.inner(local.masked_fill(outside, 0))  # (N, C)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(out)


class GatheredLogits(nn.Module):
    """The vocab-parallel head: (S, C) -> this rank's (S, Vp) -> all ranks' (S, V) (padding rows dropped)."""

    def __init__(self, inner: nn.Module, vocab: int, group: TPGroup) -> None:
        super().__init__()
        self.inner = inner
        self.vocab = vocab
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last(self.inner(hidden))[:, :self.vocab]


def parallelize(model: LlamaForCausalLM, group: TPGroup, vocab: int) -> None:
    """Join the shards: all-reduce after each row-parallel projection and the embedding, all-gather the logits.
    Called after the compute backends replaced the linears (the wrappers hold whatever they chose)."""
    for layer in model.model.layers:
        layer.self_attn.o_proj = AllReduceOutput(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = AllReduceOutput(layer.mlp.down_proj, group)
        layer.mlp.row_block = 0  # whole steps: one all-reduce per step, not per block (accounting counts it so)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, group.rank, group)
    model.lm_head = GatheredLogits(model.lm_head, vocab, group)
