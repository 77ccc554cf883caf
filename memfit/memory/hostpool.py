"""Host buffers for offloading: aligned exact-size allocations, pinned-allocator-style ones, and slot pools.

Two allocation policies, because the offloaded trainer (memfit.train.finetune) compares two designs:

- `aligned_buffer`: exactly the bytes asked for (rounded to the alignment, 4 KiB by default, which O_DIRECT
  needs), from `posix_memalign`; on CUDA the range is page-locked in place with `cudaHostRegister`, so pinning
  costs no extra bytes.
- `caching_pinned_buffer`: what `torch.empty(..., pin_memory=True)` gives. PyTorch's CachingHostAllocator
  rounds every pinned request up to a power of two, so a 1.1 GiB tensor holds 2 GiB. Where no CUDA device
  is present nothing can be pinned and this is a plain `torch.empty` (no rounding), which is what a
  ZeRO-Infinity run on a CPU does too.

`SlotPool` hands out fixed slots of one or more sizes (size classes) from one backing buffer: one class
of max-size slots is DeepSpeed's swap-buffer pool, several classes sized from the model's tensors is the
adaptive pool. `acquire` blocks until a slot is free, so a prefetch thread can run ahead of the consumer
only as far as the pool allows.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from memfit.memory.mapping import MappingOwner, round_up

IO_ALIGN = 4096  # O_DIRECT wants buffer address, length and file offset on logical-block boundaries


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cuda_pinning() -> bool:
    return torch.cuda.is_available()


@dataclass
class HostBuffer:
    """A host allocation: `tensor` is the usable (nbytes,) uint8 view; `reserved_bytes` what the allocator
    really holds for it (the power-of-two block, or the aligned size)."""

    tensor: torch.Tensor
    reserved_bytes: int
    pinned: bool


def aligned_buffer(nbytes: int, align: int = IO_ALIGN, pin: bool | None = None) -> HostBuffer:
    """`nbytes` (rounded up to `align`) of host memory at an `align`-aligned address, never touched here
    (pages commit on first write). `pin`: page-lock it for CUDA (default: when CUDA is present)."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    size = round_up(max(nbytes, 1), align)
    libc = ctypes.CDLL(None, use_errno=True)
    ptr = ctypes.c_void_p()
    rc = libc.posix_memalign(ctypes.byref(ptr), ctypes.c_size_t(align), ctypes.c_size_t(size))
    if rc != 0 or not ptr.value:
        raise MemoryError(f"posix_memalign of {size} bytes failed (error {rc}); free host memory or lower the load")
    addr = int(ptr.value)
    pin = _cuda_pinning() if pin is None else pin
    if pin:
        err = torch.cuda.cudart().cudaHostRegister(addr, size, 0)
        if int(err) != 0:
            libc.free(ctypes.c_void_p(addr))
            raise MemoryError(f"cudaHostRegister of {size} bytes failed ({err}); the host may limit locked memory")

    def release() -> None:
        if pin:
            torch.cuda.cudart().cudaHostUnregister(addr)
        ctypes.CDLL(None).free(ctypes.c_void_p(addr))

    owner = MappingOwner(release)
    buf = (ctypes.c_uint8 * size).from_address(addr)
    buf._memfit_owner = owner  # type: ignore[attr-defined]  # tensor -> buf -> owner: freed with the last view
    return HostBuffer(torch.frombuffer(buf, dtype=torch.uint8)[:size], size, pin)


def caching_pinned_buffer(nbytes: int) -> HostBuffer:
    """`torch.empty(nbytes, pin_memory=True)` where CUDA is present (a power-of-two block from torch's
    CachingHostAllocator), else an ordinary `torch.empty` of exactly `nbytes`."""
    if _cuda_pinning():
        t = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return HostBuffer(t[:nbytes], next_pow2(max(nbytes, 1)), True)
    return HostBuffer(torch.empty(nbytes, dtype=torch.uint8), nbytes, False)


class SlotPool:
    """Slots of fixed sizes carved from one backing buffer. `classes` maps slot bytes -> slot count; every
    slot starts `align`-aligned. `acquire(nbytes)` returns a (nbytes,) uint8 view of the smallest free slot
    that holds it, waiting while all such slots are taken."""

    def __init__(self, name: str, classes: dict[int, int], allocate=aligned_buffer, align: int = IO_ALIGN) -> None:
        if not classes or any(b <= 0 or c <= 0 for b, c in classes.items()):
            raise ValueError(f"{name}: every slot class needs a positive size and count, got {classes}")
        self.name = name
        self.classes = {round_up(b, align): c for b, c in sorted(classes.items())}
        total = sum(b * c for b, c in self.classes.items())
        self.backing = allocate(total)
        # Swap buffers are page-locked in both systems this models (DeepSpeed's new_cpu_locked_tensor, MemAscend's
        # cudaHostRegister), so every byte is resident from the start; fault the pages in here too, so the
        # process's RSS counts what a pinned pool holds (on CUDA they are already resident).
        self.backing.tensor.zero_()
        self._free: dict[int, list[torch.Tensor]] = {}
        offset = 0
        for size, count in self.classes.items():
            self._free[size] = []
            for _ in range(count):
                self._free[size].append(self.backing.tensor[offset : offset + size])
                offset += size
        self._cond = threading.Condition()
        self._taken: dict[int, int] = {}  # data_ptr of a handed-out view -> its class size
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.peak_in_use_slots = 0

    @property
    def reserved_bytes(self) -> int:
        return self.backing.reserved_bytes

    @property
    def largest_slot(self) -> int:
        return max(self.classes)

    def acquire(self, nbytes: int) -> torch.Tensor:
        fits = [s for s in self._free if s >= nbytes]
        if not fits:
            raise MemoryError(
                f"{self.name}: a {nbytes}-byte tensor exceeds the largest slot ({self.largest_slot} bytes); "
                "raise the pool's buffer size"
            )
        with self._cond:
            while True:
                size = next((s for s in fits if self._free[s]), None)
                if size is not None:
                    slot = self._free[size].pop()
                    self._taken[slot.data_ptr()] = size
                    self.in_use_bytes += size
                    self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
                    self.peak_in_use_slots = max(self.peak_in_use_slots, len(self._taken))
                    return slot[:nbytes]
                self._cond.wait()

    def release(self, view: torch.Tensor) -> None:
        with self._cond:
            size = self._taken.pop(view.data_ptr())
            start = view.data_ptr() - self.backing.tensor.data_ptr()
            self._free[size].append(self.backing.tensor[start : start + size])
            self.in_use_bytes -= size
            self._cond.notify_all()
