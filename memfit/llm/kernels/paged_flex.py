"""Paged decode attention on PyTorch's flex attention: the block table read in place on a GPU.

The `paged` KV cache is memfit's vLLM-style baseline. On the CPU memfit's C++ kernel (cpu_paged.cpp) follows
its block tables in place; on CUDA, without this module, the paged cache gathers every sequence's blocks into a
contiguous tensor each layer and step, a copy vLLM never makes. This module is the GPU rival done properly,
with a maintained library's kernel (issue 14 names FlashInfer, flash-attn's `block_table` or flex attention;
only PyTorch is on the GPU machines here, so flex attention):

- the pool of one layer, (blocks, block_size, Hkv, D) token-major, is viewed as ONE key sequence of
  blocks * block_size positions, (1, Hkv, P, D), shared by every batch row (flex broadcasts a batch-1 K/V
  when the block mask has the query's batch);
- a BlockMask with KV_BLOCK_SIZE = the cache's block size lists row b's physical blocks: its whole blocks
  as `full_kv_indices` (attended with no mask function) and the partly filled last block (and, under a
  sliding window, the partly covered first one) as `kv_indices`, where a mask function keeps the offsets
  inside [lo, hi). That is the block table itself: the kernel loads exactly the blocks it lists, in place.

Flex attention runs compiled: Triton's decoding kernel for one query row on CUDA, inductor's C++ template on
the CPU (what the tests run; memfit's own C++ kernel stays the CPU's paged path). Eager flex attention would not
do: it evaluates the mask function over every key position and ignores the block lists, where ours is only
valid on the partial blocks it is called for. Mask bounds live in persistent buffers updated in place each step,
and index rows are as wide as the pool, so one compiled graph serves every step.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


@functools.cache
def flex_available() -> bool:
    """flex attention is in this torch (>= 2.5). Only looked up: importing it pulls in sympy (~35 MiB of resident
    memory), which an engine that never uses it on a CPU should not pay."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=True: batch size and pool size differ from step to step and cache to cache; one graph covers them.
    # fullgraph: a graph break must fail, not fall back to eager flex attention, which would evaluate the mask
    # function everywhere (see the module docstring) and return wrong rows. A recompile past dynamo's limit must
    # fail too, for the same reason: set once, process-wide (memfit compiles nothing else; patching the config
    # around each call instead cost ~2x the call on the host).
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=True, fullgraph=True)


_SHARED: dict[torch.device, FlexPagedAttention] = {}


def flex_paged_for(kv) -> FlexPagedAttention | None:
    """The in-place paged kernel for this cache where it runs: a paged cache (`block_tables`) with token-major
    blocks on CUDA, with flex attention, and not switched off (MEMFIT_PAGED_FLEX=0: gather, as before). One
    instance per device, shared by its caches (a draft model's and its target's): the same mask function, so
    no recompilation per cache; it rebuilds the mask whenever the step's table changes."""
    if (not getattr(kv, "block_tables", False) or kv.layout.device.type != "cuda" or getattr(kv, "head_major", False)
            or not flex_available() or os.environ.get("MEMFIT_PAGED_FLEX") == "0"):
        return None
    return shared_on(_SHARED, FlexPagedAttention, kv.layout.device)


def same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") names the current GPU: it matches a tensor's cuda:0 (`==` says it does not)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def shared_on(registry: dict, cls: type, device: torch.device):
    """registry's instance of cls for device (made on first use), or None once its compile failed."""
    if device not in registry:
        registry[device] = cls(device)
    return None if registry[device].failed else registry[device]


class FlexPagedAttention:
    """`paged_attention` (the CPU kernel's signature, kernels/decode.py) on flex attention. It owns the mask-bound
    buffers (B_max,) that its mask function reads, and the last step's mask."""

    def __init__(self, device: torch.device) -> None:
        if not flex_available():
            raise RuntimeError("flex attention needs torch >= 2.5")
        self.device = torch.device(device)
        self.failed: str | None = None  # why compiling failed, if it did: callers then gather instead
        self.calls = 0  # decode batches attended here (not gathered)
        self._mask_key: tuple | None = None
        self._cap = 0
        self._grow(64)

    def _grow(self, batch: int) -> None:
        cap = max(batch, 2 * self._cap)
        # per row: the first and last partial block ids and the valid offsets [lo, hi) in each
        self._first = torch.full((cap,), -1, dtype=torch.int64, device=self.device)
        self._last = torch.full((cap,), -1, dtype=torch.int64, device=self.device)
        self._lo = torch.zeros(cap, dtype=torch.int64, device=self.device)
        self._hi = torch.zeros(cap, dtype=torch.int64, device=self.device)
        self._cap = cap
        first, last, lo, hi = self._first, self._last, self._lo, self._hi

        def mask_mod(b, h, q_idx, kv_idx):  # called for partial blocks only (kv_indices)
            blk, off = kv_idx // self._bs, kv_idx % self._bs
            lo_ok = (blk != first[b]) | (off >= lo[b])
            hi_ok = (blk != last[b]) | (off < hi[b])
            return lo_ok & hi_ok

        self._mask_mod = mask_mod

    def can_attend_paged(self, q: torch.Tensor, k_pool: torch.Tensor) -> bool:
        """Token-major pools on this module's device: (blocks, block_size, Hkv, D), rows of one block contiguous."""
        if k_pool.dim() != 4 or q.device != k_pool.device or not same_device(k_pool.device, self.device):
            return False
        nb, bs, hkv, d = k_pool.shape
        return (bs >= 16 and bs & (bs - 1) == 0 and k_pool.stride(3) == 1 and k_pool.stride(2) == d
                and k_pool.stride(1) == hkv * d and k_pool.stride(0) == bs * hkv * d and q.shape[1] % hkv == 0)

    def block_mask(self, block_table: torch.Tensor, lens: torch.Tensor, block_size: int, num_blocks: int,
                   window: int | None = None) -> BlockMask:
        """Row b's physical blocks covering positions [max(0, lens[b] - window), lens[b]) as a BlockMask.
        block_table: (B, >= ceil(max lens / block_size)) int64; lens: (B,) int64, each >= 1; both on the device."""
        bs, b = block_size, lens.shape[0]
        if b > self._cap:
            self._grow(b)
        self._bs = bs
        dev, table = self.device, block_table  # both already on the device (paged_attention moved them)
        rows = torch.arange(b, device=dev)
        start = torch.clamp(lens - window, min=0) if window else torch.zeros_like(lens)
        first_blk, end_blk = start // bs, (lens + bs - 1) // bs  # logical blocks [first_blk, end_blk)
        head_partial = start % bs != 0
        tail_partial = lens % bs != 0
        first_phys, last_phys = table[rows, first_blk], table[rows, end_blk - 1]
        self._first[:b] = torch.where(head_partial, first_phys, -1)
        self._last[:b] = torch.where(tail_partial, last_phys, -1)
        self._lo[:b] = start % bs
        self._hi[:b] = torch.where(tail_partial, lens % bs, bs)
        # Index rows are as wide as the pool (flex reads the listed columns only, the counts say how many; the
        # lowering wants the mask to span the whole key sequence) and are int32, as flex expects.
        # Whole blocks: the logical run [full_lo, full_hi), a gather from the table.
        full_lo = first_blk + head_partial.long()
        full_hi = torch.maximum(end_blk - tail_partial.long(), full_lo)
        width = table.shape[1]
        cols = torch.arange(width, device=dev)
        full_idx = torch.zeros(b, 1, 1, num_blocks, dtype=torch.int32, device=dev)
        full_idx[:, 0, 0, :width] = torch.gather(table, 1, torch.clamp(full_lo[:, None] + cols, max=width - 1)).int()
        full_num = (full_hi - full_lo).int()[:, None, None]
        # Partial blocks: the head block (window start inside it), then the tail block if it is another one.
        two = head_partial & tail_partial & (end_blk - 1 != first_blk)
        part_idx = torch.zeros(b, 1, 1, num_blocks, dtype=torch.int32, device=dev)
        part_idx[:, 0, 0, 0] = torch.where(head_partial, first_phys, last_phys).int()
        part_idx[:, 0, 0, 1] = last_phys.int()
        part_num = (head_partial | tail_partial).int() + two.int()
        from torch.nn.attention.flex_attention import BlockMask

        return BlockMask.from_kv_blocks(part_num[:, None, None], part_idx, full_num, full_idx, BLOCK_SIZE=(128, bs),
                                        mask_mod=self._mask_mod, seq_lengths=(1, num_blocks * bs),
                                        compute_q_blocks=False)

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                        lens: torch.Tensor, scale: float, window: int | None = None, k_new: torch.Tensor | None = None,
                        v_new: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row b of q (B, Hq, D) attends to positions [0, lens[b]) (the last `window` if given) of the sequence
        whose blocks are row b of block_table, read in place from k_pool, v_pool (blocks, block_size, Hkv, D).
        k_new, v_new (optional, (B, Hkv, D)): each row's new token, written at lens[b] - 1 first. -> (B, Hq, D).
        What is derived from block_table and lens is kept while the same two objects come back: a caller must
        pass new tensors, not edit these in place, when the step changes."""
        nb, bs, hkv, d = k_pool.shape
        # One mask a step: every layer of a step passes the same table and lens objects (CachedAttention), so the
        # device copies, the mask and the new tokens' addresses are made on the first layer only.
        key = self._mask_key
        if key is None or key[0] is not block_table or key[1] is not lens or key[2] != (window, nb, bs):
            dev = self.device
            table_d, lens_d = block_table.to(dev), lens.to(dev)
            pos = lens_d - 1  # (B,): where the new token goes
            self._step = (table_d, lens_d, table_d[torch.arange(len(pos), device=dev), pos // bs], pos % bs)
            self._mask = self.block_mask(table_d, lens_d, bs, nb, window)
            self._mask_key = (block_table, lens, (window, nb, bs))  # held, so no new tensor can take their ids
        table_d, lens_d, new_blk, new_off = self._step
        if k_new is not None:
            k_pool[new_blk, new_off] = k_new
            v_pool[new_blk, new_off] = v_new
        mask = self._mask
        k = k_pool.view(1, nb * bs, hkv, d).transpose(1, 2)  # (1, Hkv, P, D): the pool as one key sequence
        v = v_pool.view(1, nb * bs, hkv, d).transpose(1, 2)
        try:  # no eager fallback (see _compiled_flex): a failure lands here
            o = _compiled_flex()(q.unsqueeze(2), k, v, block_mask=mask, scale=scale,
                                 enable_gqa=q.shape[1] != hkv).squeeze(2)  # (B, Hq, D)
            self.calls += 1
        except Exception as exc:  # noqa: BLE001 - any compile failure: this step and later ones gather instead
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("flex attention failed on the paged cache (%s); the paged cache gathers its blocks instead",
                        self.failed)
            o = _gathered(q, k_pool, v_pool, table_d, lens_d, scale, window)
        if out is None:
            return o
        out.copy_(o)
        return out


def _gathered(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
              scale: float, window: int | None) -> torch.Tensor:
    """The gather path, for a step whose flex call failed: each row's blocks copied out, masked SDPA -> (B, Hq, D)."""
    nb, bs, hkv, d = k_pool.shape
    b, width = table.shape
    k = k_pool[table].reshape(b, width * bs, hkv, d).transpose(1, 2)  # (B, Hkv, L, D)
    v = v_pool[table].reshape(b, width * bs, hkv, d).transpose(1, 2)
    pos = torch.arange(width * bs, device=q.device)
    keep = pos < lens[:, None]  # (B, L)
    if window:
        keep &= pos >= (lens - window)[:, None]
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=keep[:, None, None, :], scale=scale,
                                          enable_gqa=q.shape[1] != hkv).squeeze(2)
