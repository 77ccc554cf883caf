"""BlockedLinear: decode matmuls of a few to a few dozen rows on a weight packed once for memfit's kernel.

At 3-32 rows a decode matmul is bound by reading the weight *and* by the multiply-adds in about equal
measure, so the kernel needs both a sequential weight stream and register blocking that feeds the FMA units
without horizontal reductions. cpu_blocked.cpp gets both from a layout of panels of `nb` output columns
stored K-step-major (bf16: VNNI pairs for vdpbf16ps). Measured with one thread on a Zen 4 core over Llama
0.1b/0.5b layer stacks (benchmarks/blocked_linear.py): against oneDNN's prepacked matmul 1.55-1.6x at 8 rows,
1.2-1.5x at 4 and 16, 1.13-1.24x at 32; at 1-2 rows 1.15-1.6x the row-major kernel (linear.py).

Prefill: inside a step the runner marks as carrying prefill rows, calls of LARGE_M rows or more run on the
kernel measured fastest for the weight's shape (large_m.py: this AVX-512 kernel or AMX tiles on the same
packed weight, cpu_amx.cpp); everywhere else, decode steps included, on the AVX-512 kernel.

Memory: the packed copy *replaces* the weight. BlockedLinear keeps no reference to the nn.Linear's weight,
and `use_blocked_linears` (blocked_model.py) gives back the resident pages of a memory-mapped checkpoint tensor it replaced
(`memfit.memory.pages.drop_file_pages`), so the model holds one copy of each matrix (plus at most `nb` - 1
zero columns per matrix of padding); while packing, one matrix is held twice.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memfit.llm.kernels import large_m
from memfit.llm.kernels.build import load_cpu_linear, unavailable_reason
from memfit.memory.host import HostArena

log = logging.getLogger(__name__)
_amx_fallback_logged = False  # one warning per process

DEFAULT_NB = 64  # output columns per panel (32, 48 or 64); 64 measured best overall on Zen 4
LARGE_M = 64  # cpu_blocked.cpp's BLK_LARGE_M: from this many rows each row's sums run in one order, whatever M
# The MLP's row block for bf16 (models/llama.py: MLP.row_block). At 64 rows each block re-streams the MLP's
# weights from L3 and runs the MLP's Python once more: on AMX tiles the weights arrive slower than the tiles use
# them (0.1b bf16, 32 x 128 tokens: 1.95 s in 64-row blocks, 1.52 s whole, benchmarks/prefill.py); on one Zen 4
# core (AVX-512 BF16, no AMX; the same batch, the blocks alternating in one process, load 5.7; a /tmp script, not
# kept) 3.47 s at 64 rows, 3.44 at 128, 3.37 at 256, 3.35 whole. 256 rows keep a 512-token step to two blocks; their transients (gate/up
# and the product, 3 x I values a row) are 3 MiB at the 0.1b shape's I = 2048, 21 MiB at Llama-3-8B's 14336.
# float32 keeps LARGE_M (not measured; twice the bytes a row).
BF16_MLP_ROW_BLOCK = 256
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(frozen=True)
class _Fns:
    packed_elems: ctypes._CFuncPtr  # (N, K, nb, is_bf16) -> elements of the packed form, -1: bad nb
    pack: ctypes._CFuncPtr  # (w, ldw, out, N, K, nb) -> 0 / -1
    unpack: ctypes._CFuncPtr  # (packed, w, N, K, nb) -> 0 / -1
    linear: ctypes._CFuncPtr  # (x, ldx, wp, b, y, ldy, M, N, K, nb, nthreads) -> 0 / negative


def _functions(dtype: torch.dtype) -> _Fns | None:
    """The kernel's functions for `dtype`, signatures declared; None when this machine can't run them."""
    if dtype not in _SUFFIX or unavailable_reason(dtype) is not None:
        return None
    lib = load_cpu_linear()
    assert lib is not None
    c, s = lib.cdll, _SUFFIX[dtype]
    sigs = {"packed_elems": ("memfit_blocked_packed_elems", [_I64, _I64, _I64, _I32], _I64),
            "pack": (f"memfit_blocked_pack_{s}", [_P, _I64, _P, _I64, _I64, _I64], _I32),
            "unpack": (f"memfit_blocked_unpack_{s}", [_P, _P, _I64, _I64, _I64], _I32),
            "linear": (f"memfit_blocked_linear_{s}", [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I32], _I32)}
    fns = {}
    for key, (name, argtypes, restype) in sigs.items():
        fn = getattr(c, name)
        fn.argtypes, fn.restype = argtypes, restype
        fns[key] = fn
    return _Fns(**fns)


def mlp_row_block(dtype: torch.dtype) -> int:
    """Rows per MLP block for a model of `dtype` held in this kernel's layout (kernels/backends.mlp_row_blocks;
    engine/accounting.mlp_row_block counts the same): BF16_MLP_ROW_BLOCK for bf16, whichever kernel (AVX-512 or
    AMX tiles) runs its prefill rows, else LARGE_M. Either kernel sums a row alone from LARGE_M rows on, so the
    block changes no bit."""
    return BF16_MLP_ROW_BLOCK if dtype == torch.bfloat16 else LARGE_M


def can_use_blocked(dtype: torch.dtype) -> bool:
    """Can BlockedLinear run a CPU weight of `dtype` on this machine?"""
    return _functions(dtype) is not None


class BlockedLinear(nn.Module):
    """y = x W^T + b with W (N, K) held only in memfit's blocked layout. x: (..., K) -> (..., N), x's dtype
    must be the weight's. Inference only: with autograd recording for an x that requires grad, it falls
    back to F.linear on a freshly unpacked weight (correct, slow, no weight gradient)."""

    def __init__(self, linear: nn.Linear, nb: int = DEFAULT_NB, nthreads: int | None = None,
                 out: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach()  # (N, K)
        if w.device.type != "cpu" or w.dim() != 2:
            raise ValueError(f"BlockedLinear needs a 2-D CPU weight, got {tuple(w.shape)} on {w.device}")
        fns = _available(w.dtype)
        n, k = w.shape
        elems = packed_numel(linear, nb)
        if w.stride(1) != 1:
            w = w.contiguous()
        # (panels, steps, nb, span) flattened; a plain attribute, not a Parameter/buffer: it is no
        # state_dict entry and .to(dtype) must not reinterpret it. `out`: where to pack (e.g. a slice of a
        # huge-page HostArena, see pack_blocked); by default a tensor of its own.
        if out is None:
            out = torch.empty(elems, dtype=w.dtype)
        elif out.dtype != w.dtype or out.numel() != elems or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out must be a contiguous CPU tensor of {elems} x {w.dtype}, got {out.numel()} x "
                             f"{out.dtype} on {out.device}")
        self.packed = out
        if fns.pack(w.data_ptr(), w.stride(0), self.packed.data_ptr(), n, k, nb) != 0:
            raise RuntimeError("packing the weight failed")
        b = linear.bias
        self.bias = None if b is None else b.detach().to(w.dtype).contiguous().clone()  # (N,)
        self.in_features, self.out_features, self.nb, self.dtype = k, n, nb, w.dtype
        self.nthreads = nthreads  # None: torch.get_num_threads() at each call
        self._fns = fns
        self._wp = self.packed.data_ptr()  # cached: the tensors never move
        self._bp = None if self.bias is None else self.bias.data_ptr()

    def unpack_weight(self) -> torch.Tensor:
        """The weight back in row-major (N, K) form (a new tensor)."""
        w = torch.empty(self.out_features, self.in_features, dtype=self.dtype)
        self._fns.unpack(self.packed.data_ptr(), w.data_ptr(), self.out_features, self.in_features, self.nb)
        return w

    takes_out = True  # forward(x, out=...): models/llama.py's step-arena call sites ask for it

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: where to write the (M, N) result when it is a contiguous CPU tensor of that shape and the weight's
        dtype (the step arena, memfit/memory/scratch.py), else a new tensor is made; the result is returned either
        way. The kernel writes each output element once, so the bits do not depend on where."""
        if x.dtype != self.dtype or x.device.type != "cpu":
            raise TypeError(f"BlockedLinear holds a {self.dtype} CPU weight; got a {x.dtype} input on {x.device} "
                            f"(convert the input, or keep an nn.Linear for this layer)")
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"expected inputs of {k} features, got shape {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            return F.linear(x, self.unpack_weight(), self.bias)  # autograd through x only
        flat = x.dim() == 2  # the decode case: skip the reshape/view (a few microseconds per call)
        x2 = x if flat else x.reshape(-1, k)  # (M, K), a view when x allows
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        ok = (out is not None and out.shape == (m, n) and out.dtype == self.dtype and out.is_contiguous()
              and out.device.type == "cpu" and out.data_ptr() != x2.data_ptr())
        y = out if ok else torch.empty(m, n, dtype=self.dtype)  # (M, N)
        if m >= LARGE_M and large_m.in_prefill_step():
            self._many_rows(x2, y)
        elif m:
            self._run("avx512", x2, y)
        return y if flat else y.view(*x.shape[:-1], n)

    def _run(self, kernel: str, x2: torch.Tensor, y: torch.Tensor) -> None:
        """y (M, N) = x2 (M, K) W^T + b on `kernel` (large_m.KERNELS); AMX falls back to AVX-512 if it fails."""
        m, n, k = x2.shape[0], self.out_features, self.in_features
        args = (x2.data_ptr(), x2.stride(0), self._wp, self._bp, y.data_ptr(), n, m, n, k, self.nb,
                self.nthreads or torch.get_num_threads())
        if kernel == "amx":
            rc = large_m.amx_linear()(*args)
            if rc == 0:
                return
            global _amx_fallback_logged
            if not _amx_fallback_logged:  # rows computed now carry the AVX-512 kernel's bits, not AMX's
                _amx_fallback_logged = True
                log.warning("AMX linear failed (code %d, -5: no memory for its scratch); this call and any other "
                            "that fails run on the AVX-512 kernel", rc)
        rc = self._fns.linear(*args)
        if rc != 0:
            raise RuntimeError(f"memfit_blocked_linear failed with code {rc}")

    def _many_rows(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        """A prefill step's many rows: on the kernel kept for this weight's shape (large_m.choose measures it on
        the first such call), but the step's decode rows among them (large_m.decode_rows, the first d) on the
        decode kernel, by themselves, as a pure decode step of those rows runs them (the AMX kernel computes each
        row alone, so the prefill rows' bits do not change either)."""
        names = large_m.candidates(self.dtype, self.in_features)
        runs = {name: (lambda name=name: self._run(name, x2, y)) for name in names}
        kernel = large_m.choose((self.out_features, self.in_features, self.nb), x2.shape[0], runs)
        d = large_m.decode_rows(x2.shape[0]) if kernel != "avx512" else 0
        if d:
            self._run("avx512", x2[:d], y[:d])
            x2, y = x2[d:], y[d:]
        if x2.shape[0]:
            self._run(kernel, x2, y)

    def silu_mul_rows(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """For the MLP's gate/up matrix (N = 2I: the gate's rows, then the up's): SiLU(gate) * up of x (M, K) in
        one call that sums a gate panel and its up panel side by side and meets them in the store, the product in
        columns [0, I) of `out` (M, 2I), or of a new (M, I) tensor; returns that (M, I) view. The same bits as
        this matrix's forward followed by CpuDecodeOps' silu_mul kernel over its output (the kernels round where
        they do), without writing the up half and reading both back: on AMX tiles (memfit_amx_linear_silu_bf16)
        0.057 s of a 1.17 s prefill batch went to silu_mul; on the AVX-512 kernel (memfit_blocked_linear_silu_bf16)
        silu_mul was 1.3% of a 3.4 s batch on one Zen 4 core (benchmarks/prefill.py's batch under perf record, not
        kept).
        Runs on whichever kernel forward would run all of x's rows on: AMX where a prefill step keeps it for this
        shape and the step has no decode rows, else the AVX-512 kernel from LARGE_M rows on. None, having
        computed nothing, elsewhere (bf16 only, under LARGE_M rows, I not a multiple of nb, an odd K, a step whose
        decode rows would run apart, autograd); the caller then runs forward and silu_mul."""
        m, k, n = x.shape[0], self.in_features, self.out_features
        if (x.dim() != 2 or m < LARGE_M or x.dtype != self.dtype or self.dtype != torch.bfloat16
                or x.device.type != "cpu" or x.shape[1] != k or n % 2 or (n // 2) % self.nb
                or (x.requires_grad and torch.is_grad_enabled())):
            return None
        if x.stride(-1) != 1:
            x = x.contiguous()
        ok = (out is not None and out.shape == (m, n) and out.dtype == self.dtype and out.is_contiguous()
              and out.device.type == "cpu" and out.data_ptr() != x.data_ptr())
        y = out if ok else torch.empty(m, n // 2, dtype=self.dtype)  # (M, 2I) or (M, I)
        kernel = "avx512"
        if large_m.in_prefill_step():
            runs = {name: (lambda name=name: self._run(name, x, y if ok else torch.empty(m, n, dtype=self.dtype)))
                    for name in large_m.candidates(self.dtype, k)}
            kernel = large_m.choose((n, k, self.nb), m, runs)  # the first call of the shape measures both
            if kernel != "avx512" and large_m.decode_rows(m):
                return None  # its decode rows run apart on the AVX-512 kernel (_many_rows)
        fn = amx_linear_silu() if kernel == "amx" else blocked_linear_silu()
        if fn is None:
            return None
        rc = fn(x.data_ptr(), x.stride(0), self._wp, self._bp, y.data_ptr(), y.stride(0), m, n // 2, k, self.nb,
                self.nthreads or torch.get_num_threads())
        return y[:, : n // 2] if rc == 0 else None

    def rope_rows(self, x: torch.Tensor, out: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  rot_cols: int) -> torch.Tensor | None:
        """For the attention's q/k/v matrix with heads of 64: x (M, K) W^T + b with its first `rot_cols` columns (q's
        and k's heads) rotated by each row's cos/sin rows ((M, 64) each, bf16, contiguous rows; sin signed as
        models/llama.py's RopeAt folds it), in one call (memfit_blocked_linear_rope_bf16): the same bits as forward
        followed by CpuDecodeOps.rope over those columns, without reading q and k back (rope was 0.7% of a prefill
        batch on one Zen 4 core). Written into `out` (M, N) when it is a contiguous tensor of that shape, else a new
        one; returns it. None, having computed nothing, wherever forward would not run all of x's rows on the AVX-512
        many-row path (under LARGE_M rows, the AMX kernel kept for this shape in a prefill step, nb other than 64,
        not bf16, autograd), and for tables of another shape: the caller then runs forward and rope."""
        m, k, n = x.shape[0], self.in_features, self.out_features
        if (x.dim() != 2 or m < LARGE_M or x.dtype != self.dtype or self.dtype != torch.bfloat16 or self.nb != 64
                or x.device.type != "cpu" or x.shape[1] != k or rot_cols % 64 or not 0 <= rot_cols <= n
                or (x.requires_grad and torch.is_grad_enabled())
                or cos.shape != (m, 64) or sin.shape != (m, 64) or cos.dtype != self.dtype or sin.dtype != self.dtype
                or cos.stride() != (64, 1) or sin.stride() != (64, 1)):
            return None
        if x.stride(-1) != 1:
            x = x.contiguous()
        ok = (out is not None and out.shape == (m, n) and out.dtype == self.dtype and out.is_contiguous()
              and out.device.type == "cpu" and out.data_ptr() != x.data_ptr())
        y = out if ok else torch.empty(m, n, dtype=self.dtype)  # (M, N)
        if large_m.in_prefill_step():
            runs = {name: (lambda name=name: self._run(name, x, y)) for name in large_m.candidates(self.dtype, k)}
            if large_m.choose((n, k, self.nb), m, runs) != "avx512":  # the first call of the shape measures both
                return None
        fn = blocked_linear_rope()
        if fn is None:
            return None
        rc = fn(x.data_ptr(), x.stride(0), self._wp, self._bp, y.data_ptr(), n, m, n, k, self.nb,
                self.nthreads or torch.get_num_threads(), cos.data_ptr(), sin.data_ptr(), 64, rot_cols)
        return y if rc == 0 else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"kernel=memfit blocked (nb={self.nb})")


_amx_silu: list[ctypes._CFuncPtr | None] = []  # memfit_amx_linear_silu_bf16, looked up once


def amx_linear_silu() -> ctypes._CFuncPtr | None:
    """cpu_amx.cpp's memfit_amx_linear_silu_bf16 (the MLP's gate/up matmul with SiLU(gate) * up in its store),
    or None where this process can't run AMX (large_m.amx_linear decides)."""
    if not _amx_silu:
        plain = large_m.amx_linear()
        fn = None
        if plain is not None:
            fn = load_cpu_linear().cdll.memfit_amx_linear_silu_bf16
            fn.argtypes, fn.restype = list(plain.argtypes), ctypes.c_int
        _amx_silu.append(fn)
    return _amx_silu[0]


_blocked_silu: list[ctypes._CFuncPtr | None] = []  # memfit_blocked_linear_silu_bf16, looked up once


def blocked_linear_silu() -> ctypes._CFuncPtr | None:
    """cpu_blocked.cpp's memfit_blocked_linear_silu_bf16 (the MLP's gate/up matmul with SiLU(gate) * up in the
    AVX-512 kernel's store), or None where the bf16 kernel can't run here."""
    if not _blocked_silu:
        plain = _functions(torch.bfloat16)
        fn = None
        if plain is not None:  # memfit_blocked_linear_bf16's signature, I in N's place
            fn = load_cpu_linear().cdll.memfit_blocked_linear_silu_bf16
            fn.argtypes, fn.restype = list(plain.linear.argtypes), _I32
        _blocked_silu.append(fn)
    return _blocked_silu[0]


_blocked_rope: list[ctypes._CFuncPtr | None] = []  # memfit_blocked_linear_rope_bf16, looked up once


def blocked_linear_rope() -> ctypes._CFuncPtr | None:
    """cpu_blocked.cpp's memfit_blocked_linear_rope_bf16 (the q/k/v matmul with the rotary embedding in the AVX-512
    kernel's store), or None where the bf16 kernel can't run here."""
    if not _blocked_rope:
        plain = _functions(torch.bfloat16)
        fn = None
        if plain is not None:  # memfit_blocked_linear_bf16's signature, then cos, sin, ldc, rot_cols
            fn = load_cpu_linear().cdll.memfit_blocked_linear_rope_bf16
            fn.argtypes, fn.restype = list(plain.linear.argtypes) + [_P, _P, _I64, _I64], _I32
        _blocked_rope.append(fn)
    return _blocked_rope[0]


class BlockedEmbedding(nn.Module):
    """Token embedding looked up in a tied head's packed weight, so a tied matrix is held once (packed).

    The blocked layout is out[p][s][c][e] = W[p * nb + c][s * span + e] (cpu_blocked.cpp), so row v of W is
    packed[v // nb, :, v % nb, :] flattened: one gather of K elements per token, no unpacking of the matrix.
    ids: (N,) -> (N, K)."""

    def __init__(self, head: BlockedLinear) -> None:
        super().__init__()
        self.head = head  # shares the packed tensor; not a submodule copy (BlockedLinear holds no Parameter)
        self.num_embeddings, self.embedding_dim, self.nb = head.out_features, head.in_features, head.nb
        span = 2 if head.dtype == torch.bfloat16 else 1
        steps = -(-head.in_features // span)
        panels = -(-head.out_features // head.nb)
        self._panels = head.packed.view(panels, steps, head.nb, span)  # (P, S, nb, span), a view

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        rows = self._panels[ids // self.nb, :, ids % self.nb, :]  # (N, S, span)
        return rows.reshape(*ids.shape, -1)[..., : self.embedding_dim]

    @property
    def weight(self) -> torch.Tensor:
        """The matrix in row-major form (a new tensor): for code that reads embed_tokens.weight."""
        return self.head.unpack_weight()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, looked up in the packed lm_head"


def _available(dtype: torch.dtype) -> _Fns:
    """The kernel's functions for `dtype`, or a RuntimeError saying why this machine can't run them."""
    fns = _functions(dtype)
    if fns is None:
        reason = (unavailable_reason(dtype) or "the library failed to load (see the log)") if dtype in _SUFFIX \
            else "only bfloat16 and float32 are supported"
        raise RuntimeError(f"memfit's blocked CPU kernel is unavailable for {dtype}: {reason}")
    return fns


def packed_numel(linear: nn.Linear, nb: int = DEFAULT_NB) -> int:
    """Elements of `linear`'s weight in the blocked layout (N rounded up to whole panels, K to whole steps)."""
    fns = _available(linear.weight.dtype)
    n, k = linear.weight.shape
    elems = fns.packed_elems(n, k, nb, int(linear.weight.dtype == torch.bfloat16))
    if elems < 0:
        raise ValueError(f"nb must be 32, 48 or 64, got {nb}")
    return int(elems)


def blocked_arena(linears: list[nn.Linear], nb: int = DEFAULT_NB, huge_pages: bool = True) -> HostArena:
    """One HostArena with room for all of `linears` packed (each slice 64-byte aligned): the decode step
    then streams its weights from one huge-page range (memfit/memory/host.py says why that is faster)."""
    need = HostArena.bytes_for([packed_numel(lin, nb) * lin.weight.element_size() for lin in linears])
    return HostArena(need, huge_pages=huge_pages)


def pack_blocked(linears: list[nn.Linear], nb: int = DEFAULT_NB, nthreads: int | None = None,
                 huge_pages: bool = True) -> list[BlockedLinear]:
    """BlockedLinear for each of `linears`, all packed into one arena (blocked_arena)."""
    arena = blocked_arena(linears, nb, huge_pages)
    return [BlockedLinear(lin, nb, nthreads, out=arena.take(packed_numel(lin, nb), lin.weight.dtype)) for lin in linears]
