"""memfit's CPU kernels for the element-wise parts of a decode step, and attention read from the KV cache.

`CpuDecodeOps` is a drop-in for the model's `TorchOps` (memfit.llm.models.ops): RMSNorm with the residual add
fused, rotary embedding in place, SiLU(gate) * up, each one C++ call (cpu_decode.cpp) instead of 2-8 PyTorch
ops. It takes an input only when the kernel can run it exactly (CPU, bf16/fp32 matching the weights, rows
with unit stride, no autograd); anything else goes to the PyTorch reference it inherits, so training and
exotic layouts keep working. `decode_attention` runs single-token attention straight out of a cache that
keeps each sequence's K/V at a fixed stride (the virtual cache), with no gather, padding or mask;
`paged_attention` runs the same arithmetic (attend.h) through a block table (the paged cache, cpu_paged.cpp).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from memfit.llm.kernels.build import amx_allowed, load_cpu_linear, unavailable_reason
from memfit.llm.models.ops import TorchOps

log = logging.getLogger(__name__)

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rmsnorm": [_P, _I64, _P, _I64, _P, _I64, _P, _F32, _P, _I64, _I64, _I64],
    "rope": [_P, _I64, _I32, _P, _I64, _I32, _I32, _P, _P, _I64, _I64],
    "silu_mul": [_P, _I64, _P, _I64, _P, _I64, _I64, _I64],
    "decode_attn": [_P, _I64, _P, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I64, _F32, _P, _I64, _P, _P, _I64, _I32],
    "paged_attn": [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _P, _I64, _I32, _I32, _I32, _I64, _F32, _P, _I64, _P, _P,
                   _I64, _I32],
    "argmax": [_P, _I64, _I64, _I64, _P],
}
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
HEAD_DIMS = (32, 64, 96, 128, 256)
SILU_MIN_ROWS = 8  # head sizes the attention kernel is compiled for (cpu_decode.cpp)


def _functions(dtype: torch.dtype) -> dict[str, ctypes._CFuncPtr] | None:
    if dtype not in _SUFFIX or unavailable_reason(dtype) is not None:
        return None
    lib = load_cpu_linear()
    assert lib is not None
    fns = {}
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib.cdll, f"memfit_{name}_{_SUFFIX[dtype]}")
        fn.argtypes, fn.restype = argtypes, None
        fns[name] = fn
    if dtype == torch.bfloat16 and not _amx_checked:  # nothing has set it yet: the environment's default
        _amx_checked.append(True)
        _set_mode(decode_amx_env())
    return fns


# Decode attention's AMX mode is set up once, at the kernels' first bf16 use, from MEMFIT_DECODE_AMX: "auto" (the
# default) runs the tiles where they measured the faster (the paged cache's blocks, head-major slots, per-layer slots
# where a KV head has 4 or more query heads) or level (per-layer slots of at most 512 bytes a token read a sequence
# at a time, where the tiles give the paged cache's bits) and AVX-512 elsewhere (other per-layer reads with fewer
# query heads a KV head, where the tiles went both ways; a token-major slot's rows, not measured: attend_amx.h's
# decode_amx_takes); 1 the tiles everywhere, 0 nowhere (docs/engine.md, "On AMX tiles").
_amx_checked: list[bool | None] = []
_AMX_MODES = {0: False, 1: True, 2: "auto"}


def decode_amx_env() -> bool | str:
    """MEMFIT_DECODE_AMX, checked: "auto" (unset or "auto"), True ("1") or False ("0")."""
    raw = os.environ.get("MEMFIT_DECODE_AMX", "auto").strip().lower() or "auto"
    if raw not in ("auto", "0", "1"):
        raise ValueError(f"MEMFIT_DECODE_AMX={raw!r}: expected auto, 1 (AMX tiles everywhere) or 0 (AVX-512 only)")
    return "auto" if raw == "auto" else raw == "1"


def decode_amx_mode() -> bool | str:
    """The bf16 decode attention's AMX mode in this process (set up at the kernels' first bf16 use): False (AVX-512),
    True (AMX tiles wherever they take the shape) or "auto" (the tiles where they measured the faster or level)."""
    if unavailable_reason(torch.bfloat16) is None and not _amx_checked:
        _functions(torch.bfloat16)
    if unavailable_reason(torch.bfloat16) is not None:
        return False
    fn = load_cpu_linear().cdll.memfit_decode_set_amx
    fn.argtypes, fn.restype = [_I32], _I32
    return _AMX_MODES.get(fn(-1), False)


def decode_amx_on() -> bool:
    """Whether bf16 decode attention may run on AMX tiles in this process (mode True or "auto")."""
    return decode_amx_mode() is not False


def set_decode_amx(on: bool | str) -> bool | str | None:
    """Run bf16 decode attention (both caches' readers) on AMX tiles (attend_amx.h: True), on AVX-512 (attend.h:
    False), or on the tiles where they measured the faster or level ("auto": paged blocks, head-major slots, per-layer
    slots with 4 or more query heads a KV head, and those of at most 512 bytes a token read a sequence at a time; the
    rest on AVX-512). The tiles are taken only where this process may use AMX (the CPU has AMX-BF16,
    MEMFIT_CPU_ISA does not hide it, Linux grants the tile state); elsewhere every mode is AVX-512. Returns the mode
    before, or None where the kernels do not run. The kernels' first bf16 use sets it from MEMFIT_DECODE_AMX
    (default auto); tests and benchmarks set it to compare the paths."""
    if on not in (True, False, "auto"):
        raise ValueError(f"set_decode_amx({on!r}): expected True, False or 'auto'")
    if unavailable_reason(torch.bfloat16) is not None:
        return None
    if not _amx_checked:  # the environment's default first, so the mode returned is the one this call replaces
        _amx_checked.append(True)  # decided: the first bf16 use keeps the mode set below
        _set_mode(decode_amx_env())
    return _set_mode(on)


def _set_mode(on: bool | str) -> bool | str | None:
    lib = load_cpu_linear().cdll
    fn = lib.memfit_decode_set_amx
    fn.argtypes, fn.restype = [_I32], _I32
    mode = 2 if on == "auto" else 1 if on else 0
    if mode:
        avail = lib.memfit_amx_available
        avail.restype = ctypes.c_int
        mode = mode if amx_allowed() and avail() == 1 else 0
    old = fn(mode)
    return None if old < 0 else _AMX_MODES.get(old, False)


def set_by_seq_min_bytes(nbytes: int) -> int | None:
    """The step's K + V bytes (a layer, all its sequences) from which a per-layer cache is read a sequence at a time,
    every head in one pass (attend.h's attend_heads; below, head by head: the same bits, cpu_decode.cpp says which
    is faster where). -1 is the default: on AVX-512 `by_seq_default`'s (by the CPU's vendor), 0 on AMX tiles.
    Returns the previous value, or None where the kernels do not run. Tests set 0 (or 2**62) to pin a path."""
    if unavailable_reason(torch.float32) is not None:
        return None
    fn = load_cpu_linear().cdll.memfit_decode_set_by_seq_min_bytes
    fn.argtypes, fn.restype = [_I64], _I64
    return int(fn(int(nbytes)))


def by_seq_default(row_bytes: int) -> tuple[int, int] | None:
    """The AVX-512 path's defaults on this CPU for rows of `row_bytes` (one token's K + V, every head): the step's K + V
    bytes from which a per-layer cache may be read a sequence at a time, and the fewest tokens a sequence needs for it
    (cpu_decode.cpp: on an Intel core 0 bytes and more K + V a sequence than 1.25x the core's L2; elsewhere 24 MiB and
    256 tokens). None where the kernels do not run."""
    if row_bytes <= 0:
        raise ValueError(f"row_bytes must be positive, got {row_bytes}")
    if unavailable_reason(torch.float32) is not None:
        return None
    fn = load_cpu_linear().cdll.memfit_decode_by_seq_default
    fn.argtypes, fn.restype = [_I64, ctypes.POINTER(ctypes.c_int64)], None
    out = (ctypes.c_int64 * 2)()
    fn(int(row_bytes), out)
    return int(out[0]), int(out[1])


def _rows_ok(t: torch.Tensor) -> bool:
    """A 2-D CPU tensor whose rows are contiguous (any row stride)."""
    return t.dim() == 2 and t.device.type == "cpu" and t.stride(1) == 1


def _out_ok(out: torch.Tensor | None, like: torch.Tensor) -> bool:
    """Can a kernel write a result shaped and typed like `like` (2-D) into `out` (an `out=` hint)?"""
    return out is not None and out.shape == like.shape and out.dtype == like.dtype and _rows_ok(out)


@functools.lru_cache(maxsize=64)
def _strides(strides: tuple[int, ...]) -> torch.Tensor:
    """Strides as the int64 array the kernels take, made once per layout (a fresh tensor costs microseconds a
    call, which shows at batch 1 over short contexts). Never written to."""
    return torch.tensor(strides, dtype=torch.int64)


def _cache_args(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                b: int) -> tuple[torch.Tensor, torch.Tensor, int | None, int | None, int]:
    """The attention kernels' cache arguments: K and V strides of the first three dims (int64 tensors), and the
    new rows' pointers and row stride (None, None, 0 without them)."""
    ks, vs = _strides(k_cache.stride()[:3]), _strides(v_cache.stride()[:3])
    if k_new is None:
        return ks, vs, None, None, 0
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    assert v_new is not None and k_new.shape == v_new.shape == (b, hkv, d) and k_new.stride() == v_new.stride()
    assert k_new.stride(2) == 1 and k_new.stride(1) == d
    return ks, vs, k_new.data_ptr(), v_new.data_ptr(), k_new.stride(0)


class CpuDecodeOps(TorchOps):
    """TorchOps whose methods run memfit's C++ kernels when they can (see the module docstring)."""

    fuses_silu_mul = True  # the fused stores (cpu_amx.cpp, cpu_blocked.cpp) round as silu_mul's kernel does (rows >= SILU_MIN_ROWS)

    @property
    def fuses_rope(self) -> bool:
        """The q/k/v matmul's rotating store (blocked_large.h's store_rope_panel) rounds as this class's bf16 rope
        kernel does; float32 keeps the two calls."""
        return self.dtype == torch.bfloat16

    def __init__(self, dtype: torch.dtype) -> None:
        fns = _functions(dtype)
        if fns is None:
            raise RuntimeError(f"memfit's CPU decode kernels are unavailable for {dtype}: "
                               f"{unavailable_reason(dtype) or 'unsupported dtype'}")
        self.dtype = dtype
        self._fn = fns

    @classmethod
    def available(cls, dtype: torch.dtype) -> bool:
        return _functions(dtype) is not None

    def _takes(self, *ts: torch.Tensor) -> bool:
        return all(t.dtype == self.dtype and t.device.type == "cpu" for t in ts) and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in ts))

    def add_rms_norm(self, x, residual, weight, eps, out=None):
        if not (self._takes(x, weight) and _rows_ok(x) and weight.is_contiguous()
                and (residual is None or (self._takes(residual) and _rows_ok(residual) and residual.shape == x.shape))):
            return super().add_rms_norm(x, residual, weight, eps)
        m, c = x.shape
        h_out, y_out = out if out is not None else (None, None)
        # The kernel reads a row of x and the residual whole before writing that row of h and y, so h may be the
        # residual itself (the step arena updates the stream in place); y must not overlap x.
        y = y_out if _out_ok(y_out, x) else torch.empty(m, c, dtype=x.dtype)  # (N, C)
        if residual is None:
            h, r_ptr, ldr, ro_ptr = x, None, 0, None
        else:
            h = h_out if _out_ok(h_out, x) else torch.empty(m, c, dtype=x.dtype)  # the new residual stream
            r_ptr, ldr, ro_ptr = residual.data_ptr(), residual.stride(0), h.data_ptr()
        self._fn["rmsnorm"](x.data_ptr(), x.stride(0), r_ptr, ldr, ro_ptr, h.stride(0), weight.data_ptr(), eps,
                            y.data_ptr(), y.stride(0), m, c)
        return h, y

    def rope(self, q, k, cos, sin_signed):
        n, hq, d = q.shape
        hkv = k.shape[1]
        if not (self._takes(q, k, cos, sin_signed) and q.stride(2) == 1 and q.stride(1) == d and k.stride(2) == 1
                and k.stride(1) == d and cos.is_contiguous() and sin_signed.is_contiguous() and d % 2 == 0):
            return super().rope(q, k, cos, sin_signed)
        # In place: q and k are this step's fresh projections (views into the q/k/v matmul output).
        self._fn["rope"](q.data_ptr(), q.stride(0), hq, k.data_ptr(), k.stride(0), hkv, d, cos.data_ptr(),
                         sin_signed.data_ptr(), d, n)
        return q, k

    def silu_mul(self, gate, up, out=None):
        # Below a few rows PyTorch's two vectorised ops beat the call's own overhead (benchmarks/decode_kernels.py:
        # 1 x 2048: 3.8 us against 7.7; 32 x 2048: 51 against 50 in bf16, 39 against 25 in fp32).
        if gate.dim() != 2 or gate.shape[0] < SILU_MIN_ROWS or not (
                self._takes(gate, up) and _rows_ok(gate) and _rows_ok(up) and gate.shape == up.shape):
            return super().silu_mul(gate, up)
        m, i = gate.shape
        # Element by element, each read before it is written: out may be gate itself (any row stride).
        y = out if _out_ok(out, gate) else torch.empty(m, i, dtype=gate.dtype)
        self._fn["silu_mul"](gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), y.data_ptr(), y.stride(0),
                             m, i)
        return y

    def can_attend(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Can `decode_attention` read this cache? k_cache: (S, Lmax, Hkv, D) with unit stride along D."""
        return (self._takes(q, k_cache) and q.dim() == 3 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
                and k_cache.dim() == 4 and k_cache.stride(3) == 1 and q.shape[2] in HEAD_DIMS
                and q.shape[1] % k_cache.shape[2] == 0 and q.shape[1] // k_cache.shape[2] <= 64)

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         lens: torch.Tensor, scale: float, window: int | None = None, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row b of q (B, Hq, D) attends to positions [0, lens[b]) of cache slot slots[b] (the last `window`
        of them if given). k_cache, v_cache: (S, Lmax, Hkv, D) strided views of one layer; slots, lens:
        (B,) int64. k_new, v_new (optional, (B, Hkv, D)): each row's new token, written at lens[b] - 1 first.
        out: (B, Hq, D) to write into (rows contiguous), else a new tensor. -> out."""
        b, hq, d = q.shape
        hkv = k_cache.shape[2]
        if out is None:
            out = torch.empty(b, hq, d, dtype=q.dtype)
        assert out.stride(2) == 1 and out.stride(1) == d
        ks, vs, kn, vn, ldn = _cache_args(k_cache, v_cache, k_new, v_new, b)
        self._fn["decode_attn"](q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), ks.data_ptr(),
                                vs.data_ptr(), slots.data_ptr(), lens.data_ptr(), b, hq, hkv, d, window or 0, scale,
                                out.data_ptr(), out.stride(0), kn, vn, ldn, torch.get_num_threads())
        return out

    def can_attend_paged(self, q: torch.Tensor, k_pool: torch.Tensor) -> bool:
        """Can `paged_attention` read this pool? k_pool: (blocks, block_size, Hkv, D), block_size a power of two."""
        bs = k_pool.shape[1] if k_pool.dim() == 4 else 0
        return self.can_attend(q, k_pool) and bs > 0 and bs & (bs - 1) == 0

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                        lens: torch.Tensor, scale: float, window: int | None = None, k_new: torch.Tensor | None = None,
                        v_new: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row b of q (B, Hq, D) attends to positions [0, lens[b]) (the last `window` if given) of the sequence
        whose blocks are row b of block_table (B, >= ceil(lens[b] / block_size)) int64 with unit column stride,
        read in place from k_pool, v_pool (blocks, block_size, Hkv, D). k_new, v_new (optional, (B, Hkv, D)):
        each row's new token, written at lens[b] - 1 first. -> out (B, Hq, D)."""
        b, hq, d = q.shape
        hkv, bs = k_pool.shape[2], k_pool.shape[1]
        if out is None:
            out = torch.empty(b, hq, d, dtype=q.dtype)
        assert out.stride(2) == 1 and out.stride(1) == d
        assert block_table.dtype == torch.int64 and block_table.dim() == 2 and block_table.stride(1) == 1
        assert lens.dtype == torch.int64 and lens.is_contiguous() and lens.shape == (b,)
        assert bs & (bs - 1) == 0 and v_pool.shape == k_pool.shape
        ks, vs, kn, vn, ldn = _cache_args(k_pool, v_pool, k_new, v_new, b)
        self._fn["paged_attn"](q.data_ptr(), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(), ks.data_ptr(),
                               vs.data_ptr(), block_table.data_ptr(), block_table.stride(0), bs, lens.data_ptr(), b, hq,
                               hkv, d, window or 0, scale, out.data_ptr(), out.stride(0), kn, vn, ldn,
                               torch.get_num_threads())
        return out

    def argmax(self, logits):
        if not (logits.dtype == self.dtype and _rows_ok(logits)):
            return super().argmax(logits)
        m, n = logits.shape
        out = torch.empty(m, dtype=torch.int64)
        self._fn["argmax"](logits.data_ptr(), logits.stride(0), m, n, out.data_ptr())
        return out
