"""Prefill attention on a CPU: memfit's kernel (cpu_prefill.cpp) for a chunk of new tokens over its context.

PyTorch's CPU SDPA (its flash kernel) ran a 128-token causal prompt of the 0.1b shape (12 query heads over 4 KV
heads of 64) at about 15 G MAC/s on one core, a sixth of the prefill's time for 2% of its multiply-adds;
cpu_prefill.cpp says how the kernel avoids that. It reads K/V where they are (the cache's rows, or the step's
own K/V for a chunk with no cached prefix) and keeps only one block of rows' scores at a time.

`prefill_attention` returns False where the kernel can't take the input (another dtype or device, autograd,
a head size other than 32/64/96/128, D not contiguous): the caller then runs `attention.attend_one`.

In bf16 on a core with AMX-BF16 that Linux lets this process use (cpu_amx.cpp's `memfit_amx_available`, asked once
per process), both products run on the tile unit instead (`memfit_prefill_attention_bf16_amx`, same semantics; both
kernels round P to bf16 before P x V in bf16); float32, and other CPUs, stay on the AVX-512 kernel. `kernel=` pins one (tests,
benchmarks/prefill_attention.py).
"""
from __future__ import annotations

import ctypes

import torch

from memfit.llm.kernels.build import amx_allowed, load_cpu_linear, unavailable_reason

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
_fns: dict[torch.dtype, ctypes._CFuncPtr | None] = {}
HEAD_SIZES = (32, 64, 96, 128)


def _declare(fn):
    fn.argtypes = [_P, _I64, _I64] * 3 + [_P, _I64, _I64] + [_I64] * 5 + [ctypes.c_float, _I64, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _function(dtype: torch.dtype):
    """The AVX-512 kernel for `dtype`, its signature declared; None where it can't run here (cached)."""
    if dtype not in _fns:
        fn = None
        if dtype in _SUFFIX and unavailable_reason(dtype) is None:
            lib = load_cpu_linear()
            if lib is not None:
                fn = _declare(getattr(lib.cdll, f"memfit_prefill_attention_{_SUFFIX[dtype]}"))
        _fns[dtype] = fn
    return _fns[dtype]


_amx: list = []  # [the AMX kernel or None], once asked
# Fewer (token, query head) rows a KV head than this stay on the AVX-512 path by default: 3 rows over 128-1024 keys
# took 20-25% longer on the tiles (V packed for the whole context, 32-row tiles mostly empty), 12 rows 0.73x.
AMX_MIN_ROWS = 8
_forced: str | None = None  # force(): "avx512" keeps bf16 off the tiles (benchmarks' before/after)


def force(kernel: str | None) -> str | None:
    """Pin the default kernel for every later call ("avx512"; "amx" where it can run; None: choose), returning
    the previous pin (benchmarks/prefill.py runs memfit with the AVX-512 path beside the default this way)."""
    global _forced
    if kernel not in (None, "avx512", "amx"):
        raise ValueError(f"unknown prefill attention kernel {kernel!r}")
    old, _forced = _forced, kernel
    return old


def amx_function():
    """The bf16 kernel on AMX tiles, or None where this process can't use AMX (cached)."""
    if not _amx:
        fn = None
        if _function(torch.bfloat16) is not None and amx_allowed():
            lib = load_cpu_linear()
            avail = lib.cdll.memfit_amx_available
            avail.restype = ctypes.c_int
            if avail() == 1:
                fn = _declare(lib.cdll.memfit_prefill_attention_bf16_amx)
        _amx.append(fn)
    return _amx[0]


def amx_scratch_blocks(context_len: int, head_dim: int, threads: int) -> tuple[int, int, int]:
    """The AMX path's heap blocks for a call over `context_len` keys (bytes: K packed, V packed, every thread's
    score rows; cpu_prefill.cpp's own sizes); zeros where this process has no AMX path."""
    if amx_function() is None:
        return (0, 0, 0)
    fn = load_cpu_linear().cdll.memfit_prefill_amx_scratch_bytes
    fn.argtypes, fn.restype = [_I64, _I64, ctypes.c_int, ctypes.c_int], _I64
    return tuple(fn(context_len, head_dim, threads, w) for w in range(3))  # type: ignore[return-value]


def available(dtype: torch.dtype) -> bool:
    """Can memfit's prefill attention run `dtype` on this machine?"""
    return _function(dtype) is not None


def kernel_for(dtype: torch.dtype) -> str | None:
    """Which kernel `prefill_attention` runs for `dtype` by default: "amx", "avx512", or None (neither)."""
    if dtype == torch.bfloat16 and _forced != "avx512" and amx_function() is not None:
        return "amx"
    return "avx512" if available(dtype) else None


def _rows_ok(t: torch.Tensor) -> bool:
    return t.dim() == 3 and t.stride(2) == 1 and t.device.type == "cpu"


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
                      out: torch.Tensor, nthreads: int | None = None, kernel: str | None = None) -> bool:
    """out (Tq, Hq, D) = causal attention of q (Tq, Hq, D), the last Tq positions of a Tk-token context, over
    k, v (Tk, Hkv, D); a sliding `window` when given. Any token and head strides, D contiguous. Returns False
    (out untouched) where the kernel can't take the input. `kernel`: "amx" or "avx512" pins one (False where
    that one can't run); None: `kernel_for`'s choice, AVX-512 below AMX_MIN_ROWS rows a KV head."""
    pinned, kernel = kernel is not None, kernel or kernel_for(q.dtype)
    if not pinned and kernel == "amx" and q.dim() == 3 and k.dim() == 3 and k.shape[1] and q.shape[0] * (q.shape[1] // k.shape[1]) < AMX_MIN_ROWS:
        kernel = "avx512"  # a few rows: packing V for 32-row tiles costs more than the tiles save
    fn = (amx_function() if q.dtype == torch.bfloat16 else None) if kernel == "amx" else _function(q.dtype)
    tq, hq, d = q.shape if q.dim() == 3 else (0, 0, 0)
    if (fn is None or not all(_rows_ok(t) for t in (q, k, v, out)) or d not in HEAD_SIZES
            or not (q.dtype == k.dtype == v.dtype == out.dtype) or k.shape != v.shape or k.shape[2] != d
            or out.shape != q.shape or k.shape[0] < tq or hq % k.shape[1] != 0
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return False
    rc = fn(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
            v.stride(1), out.data_ptr(), out.stride(0), out.stride(1), tq, k.shape[0], hq, k.shape[1], d, scale,
            window or 0, nthreads or torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"memfit_prefill_attention failed with code {rc}")
    return True


_fresh_fns: dict[torch.dtype, ctypes._CFuncPtr | None] = {}


def _fresh_function(dtype: torch.dtype):
    """cpu_prefill.cpp's memfit_prefill_attention_fresh_<dtype> (several chunks in one call), declared; None where
    the AVX-512 kernel can't run here (cached)."""
    if dtype not in _fresh_fns:
        fn = None
        if _function(dtype) is not None:
            fn = getattr(load_cpu_linear().cdll, f"memfit_prefill_attention_fresh_{_SUFFIX[dtype]}")
            fn.argtypes = [_P, _I64, _I64] * 4 + [_P, _I64] + [_I64] * 3 + [ctypes.c_float, _I64, ctypes.c_int]
            fn.restype = ctypes.c_int
        _fresh_fns[dtype] = fn
    return _fresh_fns[dtype]


def prefill_attention_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: torch.Tensor, scale: float,
                            window: int | None, out: torch.Tensor, nthreads: int | None = None) -> bool:
    """For every chunk (start, n) in `chunks` ((C, 2) int64, contiguous: prompts' chunks with no cached prefix),
    out[start : start + n] = prefill_attention(q[start : start + n], k[...], v[...]) over the chunk's own rows, in one
    call on the AVX-512 kernel: the bits of one call a chunk, without a ctypes call and the checks a chunk (32 per
    layer for a 32-prompt step). q, out (N, Hq, D); k, v (N, Hkv, D). False, having computed nothing, where that
    kernel is not `prefill_attention`'s choice for these chunks (AMX: it picks per chunk by rows) or can't take the
    input; the caller then attends chunk by chunk."""
    if kernel_for(q.dtype) != "avx512" or q.dim() != 3 or k.dim() != 3:
        return False
    fn = _fresh_function(q.dtype)
    n, hq, d = q.shape
    if (fn is None or not all(_rows_ok(t) for t in (q, k, v, out)) or d not in HEAD_SIZES
            or not (q.dtype == k.dtype == v.dtype == out.dtype) or k.shape != v.shape or k.shape[2] != d
            or out.shape != q.shape or k.shape[0] < n or not k.shape[1] or hq % k.shape[1] != 0
            or chunks.dtype != torch.int64 or chunks.dim() != 2 or chunks.shape[1] != 2 or not chunks.is_contiguous()
            or not len(chunks) or int(chunks.min()) < 0 or int((chunks[:, 0] + chunks[:, 1]).max()) > n
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return False
    rc = fn(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
            v.stride(1), out.data_ptr(), out.stride(0), out.stride(1), chunks.data_ptr(), chunks.shape[0], hq,
            k.shape[1], d, scale, window or 0, nthreads or torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"memfit_prefill_attention_fresh failed with code {rc}")
    return True
