"""CUDA backend of `memfit.memory.vmem.VirtualArena`: the driver's virtual-memory API through cuda-python.

Reserve with `cuMemAddressReserve`, then per page `cuMemCreate` + `cuMemMap` + `cuMemSetAccess`; decommit
with `cuMemUnmap` + `cuMemRelease`. Granularity from `cuMemGetAllocationGranularity` (2 MiB on current
GPUs). Imported only when an arena is created on a CUDA device.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from memfit.memory.mapping import MappingOwner, VirtualMemoryError, round_up

# ---------------------------------------------------------------------------------------------------------
# CUDA backend (driver VMM through cuda-python; imported only when used)
# ---------------------------------------------------------------------------------------------------------
def _cuda_driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6 / cuda-bindings
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]  # older cuda-python
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "the CUDA virtual-memory arena needs cuda-python: pip install 'memfit[cuda]' (or cuda-python)"
            ) from exc
    return driver


def _check(result):
    """cuda-python returns (CUresult, *values); raise on error, return the values."""
    drv = _cuda_driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        exc = VirtualMemoryError if "OUT_OF_MEMORY" in name else RuntimeError
        raise exc(f"CUDA driver call failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def _alloc_prop(ordinal: int):
    drv = _cuda_driver()
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    return prop


def cuda_granularity(ordinal: int) -> int:
    drv = _cuda_driver()
    _check(drv.cuInit(0))
    option = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check(drv.cuMemGetAllocationGranularity(_alloc_prop(ordinal), option)))


class _CudaArrayRef:
    """Exposes the reserved range through __cuda_array_interface__; torch keeps this object alive for as
    long as any tensor viewing it lives, and it keeps the mapping owner alive."""

    def __init__(self, ptr: int, size: int, owner: MappingOwner) -> None:
        self._memfit_owner = owner
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None, "stream": None,
        }


class _CudaBackend:
    def __init__(self, size: int, device: torch.device) -> None:
        drv = _cuda_driver()
        torch.cuda.init()
        self.drv = drv
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.ordinal = self.device.index
        _check(drv.cuInit(0))
        self.cu_device = _check(drv.cuDeviceGet(self.ordinal))
        self.ctx = _check(drv.cuDevicePrimaryCtxRetain(self.cu_device))  # the context torch uses
        self._bind()
        self.prop = _alloc_prop(self.ordinal)
        self.page_size = cuda_granularity(self.ordinal)
        self.size = round_up(size, self.page_size)
        self.addr = int(_check(drv.cuMemAddressReserve(self.size, self.page_size, drv.CUdeviceptr(0), 0)))
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.ordinal
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = access
        self.handles: dict[int, object] = {}  # page index -> CUmemGenericAllocationHandle
        # Reading an unmapped page is an illegal access on a GPU (a padded batch read does that), so pages
        # that must be readable but aren't committed map one shared scratch page (garbage, masked anyway).
        self.scratch: list[object] = []  # [handle] once created
        self.scratch_pages: set[int] = set()
        handles, scratch, scratch_pages = self.handles, self.scratch, self.scratch_pages
        addr, size, page, ctx, dev = self.addr, self.size, self.page_size, self.ctx, self.cu_device

        def _free() -> None:  # runs when the last tensor over the range is gone
            drv.cuCtxSetCurrent(ctx)
            for p in list(handles) + list(scratch_pages):
                drv.cuMemUnmap(drv.CUdeviceptr(addr + p * page), page)
            for h in list(handles.values()) + scratch:
                drv.cuMemRelease(h)
            handles.clear(), scratch.clear(), scratch_pages.clear()
            drv.cuMemAddressFree(drv.CUdeviceptr(addr), size)
            drv.cuDevicePrimaryCtxRelease(dev)

        self.owner = MappingOwner(_free)

    @property
    def scratch_bytes(self) -> int:
        return self.page_size if self.scratch else 0

    def make_readable(self, pages: Sequence[tuple[int, int]]) -> None:
        """Map the scratch page over every page in `pages` that is neither committed nor already scratch."""
        drv, page = self.drv, self.page_size
        todo = [p for lo, hi in pages for p in range(lo, hi) if p not in self.handles and p not in self.scratch_pages]
        if not todo:
            return
        self._bind()
        fresh = not self.scratch
        if fresh:
            self.scratch.append(_check(drv.cuMemCreate(page, self.prop, 0)))
        for p in todo:
            _check(drv.cuMemMap(drv.CUdeviceptr(self.addr + p * page), page, 0, self.scratch[0], 0))
            self.scratch_pages.add(p)
            _check(drv.cuMemSetAccess(drv.CUdeviceptr(self.addr + p * page), page, [self.access], 1))
            if fresh:  # zero the scratch page once (finite garbage only; see map)
                _check(drv.cuMemsetD8(drv.CUdeviceptr(self.addr + p * page), 0, page))
                fresh = False

    def _unmap_scratch(self, pages: Sequence[int]) -> None:
        drv, page = self.drv, self.page_size
        for p in pages:
            if p in self.scratch_pages:
                _check(drv.cuMemUnmap(drv.CUdeviceptr(self.addr + p * page), page))
                self.scratch_pages.discard(p)

    def drop_scratch(self) -> None:
        """Unmap every scratch mapping and free the scratch page."""
        if not self.scratch:
            return
        self._bind()
        torch.cuda.synchronize(self.device)
        self._unmap_scratch(sorted(self.scratch_pages))
        _check(self.drv.cuMemRelease(self.scratch.pop()))

    def _bind(self) -> None:
        """Driver calls need a current context on the calling thread (the prefault thread has none)."""
        _check(self.drv.cuCtxSetCurrent(self.ctx))

    def tensor(self) -> torch.Tensor:
        return torch.as_tensor(_CudaArrayRef(self.addr, self.size, self.owner), device=self.device)

    def map(self, lo: int, hi: int) -> None:
        drv, page = self.drv, self.page_size
        self._bind()
        if self.scratch_pages:
            if any(p in self.scratch_pages for p in range(lo, hi)):
                torch.cuda.synchronize(self.device)  # a queued padded read may still use the scratch mapping
            self._unmap_scratch(range(lo, hi))
        done: list[int] = []
        try:
            for p in range(lo, hi):
                handle = _check(drv.cuMemCreate(page, self.prop, 0))
                try:
                    _check(drv.cuMemMap(drv.CUdeviceptr(self.addr + p * page), page, 0, handle, 0))
                except BaseException:
                    drv.cuMemRelease(handle)
                    raise
                self.handles[p] = handle
                done.append(p)
            _check(drv.cuMemSetAccess(drv.CUdeviceptr(self.addr + lo * page), (hi - lo) * page, [self.access], 1))
            # Fresh device memory holds garbage (maybe NaN bit patterns, which survive a masked softmax as
            # NaN x 0); zero it like the CPU's fresh pages. Ordered on the legacy default stream.
            _check(drv.cuMemsetD8(drv.CUdeviceptr(self.addr + lo * page), 0, (hi - lo) * page))
        except BaseException:
            if done:
                self.unmap(done[0], done[-1] + 1)
            raise

    def unmap(self, lo: int, hi: int) -> None:
        drv, page = self.drv, self.page_size
        self._bind()
        torch.cuda.synchronize(self.device)  # kernels queued earlier may still read these pages
        for p in range(lo, hi):
            handle = self.handles.pop(p)
            _check(drv.cuMemUnmap(drv.CUdeviceptr(self.addr + p * page), page))
            _check(drv.cuMemRelease(handle))

    def release(self) -> None:
        pass


