"""Attention backends: the one seam between the model and the KV cache.

The model flattens every token of a step into one dimension (N tokens from several sequences, prefill
chunks and decode tokens mixed) and, in each layer, hands its post-RoPE q/k/v to an `AttentionBackend`.
The backend decides where K/V live (nowhere, a virtual-memory cache, a paged pool) and returns the
attention output. So the model never knows about caches, and a cache never knows about the model.
"""
from __future__ import annotations

import functools
import os
from typing import Protocol

import torch
import torch.nn.functional as F

from memfit.llm.kernels.chunk_batch import attend_chunks, plan_step_chunks
from memfit.llm.kernels.decode_batch import (  # noqa: F401 (SMALL_ATTENTION_ELEMS: re-exported)
    SMALL_ATTENTION_ELEMS, Workspace, attend_slot_runs, bridges_gaps, decode_attention, small_cpu_lowp,
)
from memfit.llm.kernels.paged_flex import flex_paged_for
from memfit.llm.kernels.paged_flex_chunk import flex_chunk_for
from memfit.llm.kernels.prefill import prefill_attention as cpu_prefill_attention
from memfit.llm.kernels.prefill import prefill_attention_fresh
from memfit.llm.kernels.slot_runs import make_gaps_readable, slot_runs
from memfit.llm.kernels.scratch_layout import ATTN_OUT
from memfit.memory import scratch


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (N, Hq, D), k/v: (N, Hkv, D) for this step's N tokens -> (N, Hq, D)."""
        ...


def causal_mask(q_len: int, kv_len: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Boolean mask (q_len, kv_len), True where attention is allowed. The q_len queries are the *last*
    q_len positions of a kv_len context (a prefill chunk after a cached prefix, or a decode token)."""
    offset = kv_len - q_len
    qpos = torch.arange(q_len, device=device).unsqueeze(1) + offset  # (q_len, 1)
    kpos = torch.arange(kv_len, device=device).unsqueeze(0)  # (1, kv_len)
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return allowed


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention for one sequence. q: (Tq, Hq, D); k, v: (Tk, Hkv, D), Tk >= Tq -> (Tq, Hq, D)."""
    tq, tk = q.shape[0], k.shape[0]
    if tq == 1 and small_cpu_lowp(q, k):  # one decode token over a short context: see SMALL_ATTENTION_ELEMS
        return attend_one(q.float(), k.float(), v.float(), scale, window).to(q.dtype)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
    gqa = qh.shape[0] != kh.shape[0]
    if tq == tk and window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif tq == 1 and (window is None or tk <= window):
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)  # decode: sees all
    else:
        mask = causal_mask(tq, tk, q.device, window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(0, 1)  # (Tq, Hq, D)


class DenseCausalAttention:
    """No cache: each sequence attends causally to its own tokens in this step. Used for plain forward
    passes (parity tests, training the bundled model)."""

    def __init__(self, seq_lens: list[int], scale: float, window: int | None = None) -> None:
        self.seq_lens = seq_lens
        self.scale = scale
        self.window = window

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if len(self.seq_lens) == 1:
            return attend_one(q, k, v, self.scale, self.window)
        if self.window is None and len(set(self.seq_lens)) == 1:
            # Equal lengths (training batches): one batched SDPA call instead of a loop.
            b, t = len(self.seq_lens), self.seq_lens[0]
            qb = q.view(b, t, *q.shape[1:]).transpose(1, 2)  # (B, Hq, T, D)
            kb = k.view(b, t, *k.shape[1:]).transpose(1, 2)  # (B, Hkv, T, D)
            vb = v.view(b, t, *v.shape[1:]).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, scale=self.scale, enable_gqa=qb.shape[1] != kb.shape[1]
            )
            return out.transpose(1, 2).reshape(q.shape)
        outs, start = [], 0
        for n in self.seq_lens:
            outs.append(attend_one(q[start : start + n], k[start : start + n], v[start : start + n], self.scale, self.window))
            start += n
        return torch.cat(outs, dim=0)


def batch_one_row(device: torch.device) -> bool:
    """Does a lone decode row take the batched path (CachedAttention.decode_plan)? On GPUs."""
    return device.type != "cpu"


DECODE_PAD = 64  # tokens; see CachedAttention
_UNSET = object()


class CachedAttention:
    """Attention over a KV cache for one engine step.

    The step's tokens are ordered decode sequences first (one token each, rows 0..B-1), then prefill
    chunks, then padding rows the runner may add (ignored). Per layer: write the new K/V into the cache, then attend decode rows in one batched call
    over `context_batch` and each prefill chunk over its sequence's `context`.
    """

    def __init__(self, kv, steps: list, num_decode: int, scale: float, window: int | None = None,
                 num_real: int | None = None, workspace: Workspace | None = None, kernels=None,
                 bridge: bool | None = None) -> None:
        self.kv = kv
        self.bridge = bridge  # join decode runs across empty slots; None: bridges_gaps(device)
        self.workspace = workspace
        self.num_real = num_real if num_real is not None else sum(s.num_new for s in steps)  # rows past it are padding
        self.steps = steps  # list[SeqStep], decode steps first
        self.num_decode = num_decode
        self.scale = scale
        self.window = window
        self.plan = kv.plan_step(steps)
        self.decode_ends = [s.end for s in steps[:num_decode]]
        self._decode_lens: torch.Tensor | None = None
        self._decode_plan: object = _UNSET  # built on first use: the CPU kernel below never needs it
        # memfit's CPU kernels (kernels/decode.py) read decode rows in place, with no gather, padding or mask:
        # from a cache that keeps every sequence at a fixed stride (`kv.fixed_stride`: `strided(layer)` views,
        # plan.slots), or through block tables (`kv.block_tables`: `pools(layer)`, plan.batch_table).
        # On CUDA the paged cache reads its block tables in place too: flex attention (kernels/paged_flex.py).
        if not num_decode:
            self.kernels = None
        elif hasattr(kernels, "decode_attention") or (hasattr(kernels, "paged_attention") and kv.block_tables):
            self.kernels = kernels
        else:
            self.kernels = flex_paged_for(kv)
        self._paged = False
        # prefill chunks: memfit's CPU kernel (kernels/prefill.py) where memfit's kernels run, else attend_one;
        # chunks with a cached prefix in the paged cache on CUDA: flex attention (kernels/paged_flex_chunk.py)
        self._prefill = cpu_prefill_attention if hasattr(kernels, "decode_attention") else None
        self._flex_chunk = flex_chunk_for(kv) if len(steps) > num_decode else None
        if self.kernels is not None and (kv.fixed_stride or kv.block_tables):
            self._ends = torch.tensor(self.decode_ends, dtype=torch.int64)
            if kv.fixed_stride:
                self._slots = torch.tensor(self.plan.slots[:num_decode], dtype=torch.int64)
            else:
                self._paged, self._table = True, self.plan.batch_table[:num_decode]
        else:
            self.kernels = None

    @property
    def decode_plan(self):
        """The batched read plan of the decode rows, or None (one decode row on a CPU, or a sliding window
        shorter than a context: per-sequence attention then). The context is read padded to a multiple of
        DECODE_PAD tokens (masked), so the attention matmuls see one shape per 64 tokens instead of a new one a
        step. On a GPU one row takes the batched path too: attend_one's 3-D SDPA call measured 42-243 us of
        kernel time at 512-8192 tokens on an H200, where the batched 4-D call on a copy of the same rows took
        23-27 us (benchmarks/results/cuda/kv_cache_cuda.json, batch 1)."""
        if self._decode_plan is _UNSET:
            n = self.num_decode
            windowed = self.window is not None and self.decode_ends and max(self.decode_ends) > self.window
            batched = n > 1 or (n == 1 and batch_one_row(self.kv.layout.device))
            self._decode_plan = (self.kv.plan_step(self.steps[:n], pad_to=DECODE_PAD)
                                 if batched and not windowed else None)
        return self._decode_plan

    @functools.cached_property
    def _slot_runs(self) -> list:
        """The decode rows as runs of consecutive slots of a fixed-stride cache (kernels/slot_runs.py), once a step."""
        plan, device = self.decode_plan, self.kv.layout.device
        runs = slot_runs(plan.slots, self.decode_ends, DECODE_PAD, plan.max_end, device, 
                         bridge=bridges_gaps(device) if self.bridge is None else self.bridge)
        make_gaps_readable(self.kv, runs)
        return runs

    @functools.cached_property
    def _chunk_plan(self):
        """Two or more chunks with cached prefixes (a verify pass) in one call per slot run (kernels/chunk_batch.py),
        on the PyTorch path over a fixed-stride cache; the paged cache and sliding windows keep the per-sequence
        loop (as does MEMFIT_CHUNK_LOOP=1). (step indices, runs, Q) or None."""
        if (self._prefill is not None or not self.kv.fixed_stride or self.window is not None
                or os.environ.get("MEMFIT_CHUNK_LOOP") == "1"):
            return None
        device = self.kv.layout.device
        return plan_step_chunks(self.kv, self.steps, self.num_decode, self.plan.slots, DECODE_PAD, device,
                                bridges_gaps(device) if self.bridge is None else self.bridge)

    @functools.cached_property
    def _fresh_chunks(self) -> tuple[frozenset[int], torch.Tensor] | None:
        """The prefill chunks with no cached prefix (their context is their own K/V), once a step: (their step
        indices, (C, 2) int64 rows (first row, rows) each), where memfit's CPU kernel may attend two or more of them
        in one call (kernels/prefill.py: prefill_attention_fresh); else None."""
        if self._prefill is not cpu_prefill_attention:
            return None
        idx, rows, row = [], [], 0
        for i, st in enumerate(self.steps):
            if i >= self.num_decode and st.start == 0 and st.num_new:
                idx.append(i)
                rows.append((row, st.num_new))
            row += st.num_new
        return (frozenset(idx), torch.tensor(rows, dtype=torch.int64)) if len(idx) >= 2 else None

    def _lens_for(self, length: int) -> torch.Tensor | None:
        """Valid lengths as a mask source, or None when every row fills the whole (padded) length."""
        if all(e == length for e in self.decode_ends):
            return None
        if self._decode_lens is None:
            self._decode_lens = torch.tensor(self.decode_ends, device=self.kv.layout.device)
        return self._decode_lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, b = self.num_real, self.num_decode
        out = scratch.take(ATTN_OUT, tuple(q.shape), q.dtype)  # (N, Hq, D): the step arena's, where one is active
        if out is None:
            out = torch.empty_like(q)
        if q.shape[0] > n:
            out[n:] = 0  # padding rows (see ModelRunner): attend to nothing
        first = 0
        if self.kernels is not None:
            if self._paged:
                kc, vc = self.kv.pools(layer)  # (blocks, block_size, Hkv, D) each
                ok, where = self.kernels.can_attend_paged(q[:b], kc), self._table
                attend = self.kernels.paged_attention
            else:
                kc, vc = self.kv.strided(layer)  # (S, Lmax, Hkv, D) each
                ok, where, attend = self.kernels.can_attend(q[:b], kc), self._slots, self.kernels.decode_attention
            if ok:
                rows_ok = k.stride() == v.stride() and k.stride(2) == 1 and k.stride(1) == k.shape[2]
                if b == len(self.steps) and rows_ok:  # a pure decode step: the kernel writes the new K/V itself
                    attend(q[:b], kc, vc, where, self._ends, self.scale, self.window, k[:b], v[:b], out=out[:b])
                    return out
                self.kv.write(layer, self.plan, k[:n], v[:n])
                attend(q[:b], kc, vc, where, self._ends, self.scale, self.window, out=out[:b])
                first = b
        if first == 0:
            self.kv.write(layer, self.plan, k[:n], v[:n])
        if first == 0 and self.decode_plan is not None:
            b = self.num_decode
            if self.kv.fixed_stride and not self.decode_plan.consecutive:  # gaps or another order: runs of views
                kall, vall = self.kv.strided(layer)
                attend_slot_runs(q[:b], kall, vall, self._slot_runs, self.scale, out[:b], self.workspace)
            else:
                kc, vc = self.kv.context_batch(layer, self.decode_plan)  # (B, Lmax, Hkv, D): a view, or a gather
                out[:b] = decode_attention(q[:b], kc, vc, self._lens_for(kc.shape[1]), self.scale, self.workspace)
            first = b
        batched = set()
        if first < len(self.steps) and self._chunk_plan is not None:
            batched, runs, width_q = self._chunk_plan
            kall, vall = self.kv.strided(layer)  # (S, Lmax, Hkv, D) each
            attend_chunks(q, kall, vall, runs, width_q, self.scale, out)
        fresh = self._fresh_chunks if first < len(self.steps) else None
        if fresh is not None and prefill_attention_fresh(q, k, v, fresh[1], self.scale, self.window, out):
            batched = batched | fresh[0]  # every chunk with no cached prefix attended in one call
        row = first
        for i in range(first, len(self.steps)):
            n = self.steps[i].num_new
            if i in batched:  # attended above
                row += n
                continue
            if self.steps[i].start == 0:  # no cached prefix: the context is this chunk's own K/V, as written
                kc, vc = k[row : row + n], v[row : row + n]
            elif self._flex_chunk is not None:  # the paged cache on CUDA: its blocks read in place
                st = self.steps[i]
                out[row : row + n] = self._flex_chunk.attention(q[row : row + n], *self.kv.pools(layer),
                                                                self.plan.tables[i], st.start, st.end, self.scale,
                                                                self.window)
                row += n
                continue
            else:
                kc, vc = self.kv.context(layer, self.plan, i)  # (end, Hkv, D): a view, or the paged cache's gather
            if self._prefill is None or not self._prefill(q[row : row + n], kc, vc, self.scale, self.window, out[row : row + n]):
                out[row : row + n] = attend_one(q[row : row + n], kc, vc, self.scale, self.window)
            row += n
        return out
