"""Bf16UpcastLinear: bf16 linears on CPUs without a native bf16 GEMM (no avx512_bf16, no AMX), weights kept bf16.

On such a core (AVX2-only x86: Zen 2/3, Haswell to Alder Lake) PyTorch's bf16 matmul is slow: on a Zen 3 core, one
thread, (M x 768) @ (768 x 2048) took 3.3 ms at M = 8 and 185 ms at M = 512 against 1.3 and 38 ms in float32
(MKL). memfit's AVX-512 kernels and oneDNN's bf16 packing refuse to run there. A bf16 weight widens to float32
exactly (it is a float32's top half), so both paths below compute in float32 from the same bf16 weights:

- few rows (decode, M <= FEW_ROWS): memfit's AVX2 kernel (avx2/bf16_linear.cpp) widens each weight row in
  registers and multiplies with FMA, reading every weight once per call; where it can't be built, aten's bf16
  matmul. A decode step of a 0.1B model makes 85 such calls of 15 us to 5 ms, so the Python around each is kept
  to one ctypes call: x goes in as bf16 (the kernel widens it) and parameters are read from `_parameters`. y is
  written into a region the model hands (`takes_out`) where there is one, but the step arena that hands them is
  built only where memfit's AVX-512 decode ops run, so on the hosts this path runs on y is made per call. A 1-row
  call on an 8 x 64 weight (Zen 3, one thread) went from 24-26 to 9.1-9.3 us, of which the ctypes call and
  kernel are 3.8 (aten's nn.Linear: 6.8);
- many rows (prefill): x is widened once (M x K float32), then W a block of BLOCK_N output rows at a time into
  a fixed float32 scratch (BLOCK_N x K) for MKL's float32 GEMM; rows of x go in blocks of BLOCK_M, so the
  scratch is bounded whatever the step (`scratch_bytes`) and lives in one HostArena (memfit/memory/host.py)
  shared by the model's linears, allocated on first use; the engine's ledger counts it in a step's activations
  (engine/accounting.py: matmul_scratch_bytes).

The path is chosen only where the CPU has no native bf16 multiply (`available`): where memfit's AVX-512 kernels
or oneDNN's bf16 packing run, kernels/backends.py picks those first.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from memfit.llm.kernels.avx2_build import load_avx2
from memfit.llm.kernels.build import cpu_flags

BLOCK_N = 256  # weight rows widened at a time: (256 x K) float32, 2 MiB at K = 2048 (fastest of 64-1024 here)
BLOCK_M = 512  # rows of x per pass (the engine's default step): x's float32 copy is at most 512 x K
FEW_ROWS = 32  # up to here the AVX2 kernel beat widening W (Zen 3, 1 thread: 3.6 vs 4.3 ms at 32 x 768 x 2048)
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of a native bf16 multiply


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this path applies: a bf16 model on an x86 CPU with AVX2 + FMA and no native bf16 multiply."""
    flags = cpu_flags()
    return dtype == torch.bfloat16 and {"avx2", "fma"} <= flags and not any(f in flags for f in NATIVE_BF16)


def scratch_bytes(k_max: int, rows: int) -> int:
    """The float32 scratch of a call of up to `rows` rows and K up to `k_max`, beside its bf16 output: the widened
    weight block (BLOCK_N x K), x widened (rows x K, at most BLOCK_M rows) and one block of outputs (rows x
    BLOCK_N) before they are rounded into y. 0 for calls of at most FEW_ROWS rows: the AVX2 kernel widens x into
    rows x K float32 of its own, made and freed inside the call (at most 256 KiB at 32 x 2048; x.float() made the
    same before the kernel took bf16 x)."""
    if rows <= FEW_ROWS:
        return 0
    m = min(rows, BLOCK_M)
    return 4 * (BLOCK_N * k_max + m * k_max + m * BLOCK_N)


class UpcastScratch:
    """The fixed float32 scratch the model's upcast linears share: one step runs at a time, and a call made while
    another holds it (another thread) allocates its own."""

    def __init__(self, k_max: int) -> None:
        self.k_max = k_max
        self.nbytes = scratch_bytes(k_max, BLOCK_M)
        self._flat: torch.Tensor | None = None  # (nbytes / 4,) float32, made on the first many-row call
        self.lock = threading.Lock()

    def views(self, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(m, k) for x, (BLOCK_N, k) for W's block, (m, BLOCK_N) for the outputs: views of the one buffer, W's
        first, so calls of at most `rows` rows touch no more than its first scratch_bytes(k_max, rows) bytes."""
        if self._flat is None:
            from memfit.memory.host import HostArena

            arena = HostArena(self.nbytes, huge_pages=False)
            self._flat = arena.take(self.nbytes // 4, torch.float32)
        flat = self._flat
        ws, xs = BLOCK_N * k, m * k
        return (flat[ws:ws + xs].view(m, k), flat[:ws].view(BLOCK_N, k),
                flat[ws + xs:ws + xs + m * BLOCK_N].view(m, BLOCK_N))


class Bf16UpcastLinear(nn.Module):
    """y = x W^T + b for a bf16 (N, K) weight, computed in float32 (module docstring). x: (..., K) -> (..., N) bf16."""

    def __init__(self, linear: nn.Linear, scratch: UpcastScratch) -> None:
        super().__init__()
        w = linear.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():
            raise ValueError("Bf16UpcastLinear needs a contiguous 2-D bf16 CPU weight")
        if w.shape[1] > scratch.k_max:
            raise ValueError(f"in_features {w.shape[1]} exceeds the scratch's K of {scratch.k_max}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Registered as parameters even when None or a plain tensor, so forward reads them from _parameters: a
        # decode step makes ~85 of these calls, and nn.Module.__getattr__ costs ~1 us a parameter on this core.
        # A Parameter is registered as it is: no copy (a tied embedding stays shared).
        self.register_parameter("weight", w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False))
        b = linear.bias
        if b is not None and not (b.is_contiguous() and isinstance(b, nn.Parameter)):
            b = nn.Parameter(b.detach().contiguous(), requires_grad=False)
        self.register_parameter("bias", b)
        self.scratch = scratch
        self._lib = load_avx2()

    takes_out = True  # models/llama.py's _linear hands y's region in a step arena where one is built

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        params = self._parameters
        w, b = params["weight"], params["bias"]
        if (x.dtype != torch.bfloat16 or not x.is_cpu
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, b)  # a caller given `out` uses what is returned (models/llama.py's _linear)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (M, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()  # the kernel takes a row stride only
        m, n = x2.shape[0], self.out_features
        if out is not None and (out.shape != (m, n) or out.dtype != torch.bfloat16 or out.stride(-1) != 1
                                or out.stride(0) < n):
            out = None  # not a region this call can write in place: made as usual
        y = torch.empty(m, n, dtype=torch.bfloat16) if out is None else out  # (M, N)
        if m == 0:
            pass
        elif m <= FEW_ROWS:
            self._few_rows(x2, w, b, y)
        elif not self.scratch.lock.acquire(blocking=False):
            self._many_rows(x2, y, UpcastScratch(self.scratch.k_max))  # another thread holds the shared one
        else:
            try:
                self._many_rows(x2, y, self.scratch)
            finally:
                self.scratch.lock.release()
        return y if x.dim() == 2 else y.view(*x.shape[:-1], n)

    def _few_rows(self, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> None:
        lib = self._lib
        if lib is None:
            torch.mm(x2, w.t(), out=y) if b is None else torch.addmm(b, x2, w.t(), out=y)
            return
        # x goes in as bf16: the kernel widens it (exactly), so no float32 copy is made here
        lib.linear(x2.data_ptr(), x2.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                   y.stride(0), x2.shape[0], self.out_features, self.in_features, torch.get_num_threads())

    def _many_rows(self, x2: torch.Tensor, y: torch.Tensor, scratch: UpcastScratch) -> None:
        n, k, w = self.out_features, self.in_features, self.weight
        bias = None if self.bias is None else self.bias.float()  # (N,)
        for m0 in range(0, x2.shape[0], BLOCK_M):
            m1 = min(x2.shape[0], m0 + BLOCK_M)
            xf, wf, out = scratch.views(m1 - m0, k)
            xf.copy_(x2[m0:m1])  # (m, K) bf16 -> float32, exact
            for n0 in range(0, n, BLOCK_N):
                n1 = min(n, n0 + BLOCK_N)
                wb, ob = wf[: n1 - n0], out[:, : n1 - n0]
                wb.copy_(w[n0:n1])  # (nb, K) bf16 -> float32, exact
                if bias is None:
                    torch.mm(xf, wb.t(), out=ob)
                else:
                    torch.addmm(bias[n0:n1], xf, wb.t(), out=ob)
                y[m0:m1, n0:n1].copy_(ob)  # rounded to bf16 once

    def extra_repr(self) -> str:
        kernel = "AVX2" if self._lib is not None else "aten bf16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype=bfloat16, "
                f"kernel=float32 from bf16 ({kernel} <= {FEW_ROWS} rows, MKL in blocks of {BLOCK_N} above)")


def use_upcast_linears(model: nn.Module) -> int:
    """Replace a bf16 CPU model's nn.Linear layers by Bf16UpcastLinear sharing one scratch. Returns how many;
    0 (the model untouched) where the path does not apply."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or not available(first.dtype):
        return 0
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16 and child.weight.is_contiguous()]
    if not todo:
        return 0
    scratch = UpcastScratch(max(child.in_features for _, _, child in todo))
    for parent, name, child in todo:
        setattr(parent, name, Bf16UpcastLinear(child, scratch))
    return len(todo)
