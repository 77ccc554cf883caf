"""Chunk attention over the paged cache on flex attention: a prefill chunk (or a verify chunk) with a cached
prefix reads its sequence's blocks in place on a GPU, as vLLM's varlen kernels do, instead of gathering them.

One sequence a call: q (n, Hq, D) at positions [start, end) attends causally to positions [0, end) of the
sequence whose blocks are `table` (its K/V of this chunk already written). As in kernels/paged_flex.py the
layer's pool is one key sequence (1, Hkv, P, D) and a BlockMask lists blocks (KV_BLOCK_SIZE = the cache's
block size, Q_BLOCK_SIZE = 128 rows): for each 128-row query block, the logical blocks every one of its rows
sees in full are `full_kv_indices`; the ones on the causal diagonal (and the window's edge) are `kv_indices`,
where the mask function maps a physical position to its logical one (`p2l`, the inverse of the table) and
compares positions. That mask function is right at every position, so this path needs no fallback guard
beyond the decode path's (a compile failure gathers).
"""
from __future__ import annotations

import torch

from memfit.llm.kernels.paged_flex import _compiled_flex, flex_paged_for, log, shared_on

Q_BLOCK = 128  # flex attention's query tile
NO_WINDOW = 1 << 40


_SHARED: dict[torch.device, FlexPagedChunk] = {}


def flex_chunk_for(kv) -> FlexPagedChunk | None:
    """The chunk kernel for this cache where the decode one runs (paged_flex.flex_paged_for), shared per device."""
    if flex_paged_for(kv) is None:
        return None
    return shared_on(_SHARED, FlexPagedChunk, kv.layout.device)


class FlexPagedChunk:
    """Causal chunk attention through one sequence's block table. Shared per device (paged_flex.flex_paged_for);
    its buffers (the inverse table, the chunk's start and window) are what its mask function reads."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.failed: str | None = None
        self.calls = 0  # chunks attended here (not gathered)
        self._nb = self._bs = 0
        self._key: tuple | None = None

    def _ensure(self, num_blocks: int, bs: int) -> None:
        """Buffers for pools of up to num_blocks blocks; a new mask function (a recompile) only when they grow."""
        if num_blocks <= self._nb and bs == self._bs:
            return
        self._nb, self._bs = max(num_blocks, self._nb), bs
        p2l = self._p2l = torch.full((self._nb,), -1, dtype=torch.int64, device=self.device)  # physical -> logical
        qstart = self._qstart = torch.zeros(1, dtype=torch.int64, device=self.device)
        win = self._win = torch.full((1,), NO_WINDOW, dtype=torch.int64, device=self.device)

        def mask_mod(b, h, q_idx, kv_idx):
            # (torch.div and a subtraction, not // and %: inductor's CPU template fails to compile those here)
            blk = torch.div(kv_idx, bs, rounding_mode="floor")
            lg = p2l[blk]
            pos = lg * bs + (kv_idx - blk * bs)  # the key's position in the sequence (negative: not its block)
            qpos = q_idx + qstart[0]
            return (lg >= 0) & (pos <= qpos) & (pos > qpos - win[0])

        self._mask_mod = mask_mod

    def _block_mask(self, table: torch.Tensor, n: int, start: int, window: int | None, num_blocks: int, bs: int):
        from torch.nn.attention.flex_attention import BlockMask

        self._ensure(num_blocks, bs)
        m = table.shape[0]
        self._p2l.fill_(-1)
        self._p2l[table] = torch.arange(m, device=self.device)
        self._qstart.fill_(start)
        self._win.fill_(window or NO_WINDOW)
        w = window or NO_WINDOW
        nqb = -(-n // Q_BLOCK)
        full, part = [], []
        for j in range(nqb):  # a few query blocks a chunk: index arithmetic on the host, one copy to the device
            qlo, qhi = start + j * Q_BLOCK, start + min(n, (j + 1) * Q_BLOCK) - 1  # first and last row's positions
            lo, hi = max(0, qlo - w + 1) // bs, qhi // bs  # logical blocks some row sees: [lo, hi]
            f_lo, f_hi = max(lo, -(-max(0, qhi - w + 1) // bs)), min(hi, (qlo + 1) // bs - 1)  # every row sees all
            fb = list(range(f_lo, f_hi + 1)) if f_lo <= f_hi else []
            full.append(fb)
            part.append([lb for lb in range(lo, hi + 1) if not (fb and f_lo <= lb <= f_hi)])

        def pack(lists):
            width = max(1, max(len(ls) for ls in lists))
            small = torch.zeros(nqb, width, dtype=torch.int64)  # logical blocks, on the host
            for j, ls in enumerate(lists):
                small[j, : len(ls)] = torch.tensor(ls, dtype=torch.int64)
            idx = torch.zeros(1, 1, nqb, num_blocks, dtype=torch.int32, device=self.device)  # as wide as the pool
            idx[0, 0, :, :width] = table[small.to(self.device).clamp(max=m - 1)].int()  # logical -> physical
            num = torch.tensor([[[len(ls) for ls in lists]]], dtype=torch.int32)
            return num.to(self.device), idx

        (pn, pi), (fn_, fi) = pack(part), pack(full)
        return BlockMask.from_kv_blocks(pn, pi, fn_, fi, BLOCK_SIZE=(Q_BLOCK, bs), mask_mod=self._mask_mod,
                                        seq_lengths=(n, num_blocks * bs), compute_q_blocks=False)

    def attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, start: int,
                  end: int, scale: float, window: int | None = None) -> torch.Tensor:
        """q (n, Hq, D) at positions [start, end) over the sequence's blocks `table` ((>= ceil(end / bs),) int64)
        in k_pool, v_pool (blocks, block_size, Hkv, D), causal (and windowed) -> (n, Hq, D)."""
        nb, bs, hkv, d = k_pool.shape
        n = q.shape[0]
        # Layers of a step pass the same table object: they share the mask (and the buffers its mask function
        # reads, so the last chunk's mask is the only live one). The object is held, so no new one takes its id.
        key = self._key
        if key is None or key[0] is not table or key[1] != (start, end, window, nb, bs):
            self._table = table[: -(-end // bs)].to(self.device)
            self._mask = self._block_mask(self._table, n, start, window, nb, bs)
            self._key = (table, (start, end, window, nb, bs))
        table = self._table
        k = k_pool.view(1, nb * bs, hkv, d).transpose(1, 2)  # (1, Hkv, P, D)
        v = v_pool.view(1, nb * bs, hkv, d).transpose(1, 2)
        try:
            # the pool of a shared instance may be smaller than its buffers: flex reads listed blocks only
            # flex's forward kernel tiles keys by BLOCK_N, which must divide the cache's block (16 tokens by
            # default; its default tile is larger: the H200 run refused KV_BLOCK_SIZE=16 without this)
            o = _compiled_flex()(q.transpose(0, 1).unsqueeze(0), k, v, block_mask=self._mask, scale=scale,
                                 enable_gqa=q.shape[1] != hkv,
                                 kernel_options={"BLOCK_M": 64, "BLOCK_N": min(bs, 64)})  # (1, Hq, n, D)
            self.calls += 1
            return o[0].transpose(0, 1)
        except Exception as exc:  # noqa: BLE001 - as in paged_flex: say why, gather
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("flex attention failed on a paged chunk (%s); it gathers its blocks instead", self.failed)
            return _gathered_chunk(q, k_pool, v_pool, table, start, end, scale, window)


def _gathered_chunk(q, k_pool, v_pool, table, start, end, scale, window):
    nb, bs, hkv, d = k_pool.shape
    k = k_pool[table].reshape(-1, hkv, d)[:end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, end, D)
    v = v_pool[table].reshape(-1, hkv, d)[:end].transpose(0, 1).unsqueeze(0)
    qpos = torch.arange(start, start + q.shape[0], device=q.device)[:, None]
    kpos = torch.arange(end, device=q.device)[None, :]
    keep = kpos <= qpos
    if window:
        keep &= kpos > qpos - window
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=keep,
                                                         scale=scale, enable_gqa=q.shape[1] != hkv)
    return o[0].transpose(0, 1)
