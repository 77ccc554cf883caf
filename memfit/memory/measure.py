"""Memory probes.

Probes: `rss_bytes` (resident set now), `peak_rss_bytes` (the kernel's high-water mark), `reset_peak_rss`
(Linux: writing "5" to /proc/self/clear_refs resets VmHWM, kernel >= 4.0), `HeldMemoryMeter` (anonymous and
shared memory plus given mapped files: what a block holds, without the library pages whose count depends on
the page cache), `cuda_memory` (the caching
allocator's counters) and `PeakRSSSampler`, a context manager that polls RSS from a background thread to
catch a transient peak inside a block (and also reads VmHWM when it can be reset, which catches peaks
shorter than the polling interval). `machine_info`: what a benchmark's JSON states about the machine.
The per-step memory timeline is in timeline.py.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

_PROCESS: psutil.Process | None = None  # cached per pid: a forked child must not report its parent
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


# -- probes ------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():
        _PROCESS = psutil.Process()
    return int(_PROCESS.memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since start, or since the last `reset_peak_rss`), in bytes.

    VmHWM from /proc/self/status on Linux; elsewhere getrusage's ru_maxrss, which cannot be reset.
    """
    hwm = status_bytes().get("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # POSIX only

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # macOS: bytes; Linux/BSD: KiB


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS. Returns False where the OS cannot (non-Linux, kernels
    before 4.0, or a sandbox that forbids writing /proc/self/clear_refs); `peak_rss_bytes` then keeps
    reporting the peak since the process started."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # 5 = reset the peak RSS only; 1-4 would clear page referenced/soft-dirty bits
        return True
    except OSError:
        return False


_STATUS_FIELD_RE = re.compile(rb"^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+)\s+kB", re.MULTILINE)
_SMAPS_HEADER_RE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def heap_in_use_bytes() -> int:
    """What glibc's malloc has handed out and not had back (mallinfo2: arena chunks in use plus mmapped blocks), the
    allocator's own count, blind to what it keeps resident but free. Linux/glibc only (raises elsewhere)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def status_bytes() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile and RssShmem of this process in bytes (Linux; {} elsewhere)."""
    try:
        with open(_STATUS, "rb") as f:
            return {m.group(1).decode(): int(m.group(2)) * 1024 for m in _STATUS_FIELD_RE.finditer(f.read())}
    except OSError:
        return {}


def anon_shmem_bytes() -> int | None:
    """Anonymous plus shared-memory resident bytes (RssAnon + RssShmem): what the process holds that the kernel
    cannot drop, library pages left out; None where /proc/self/status does not say."""
    st = status_bytes()
    return st["RssAnon"] + st.get("RssShmem", 0) if "RssAnon" in st else None


def mapped_file_rss_bytes(under: Iterable[str | os.PathLike]) -> int:
    """Resident bytes of this process's mappings of files under these directories (from /proc/self/smaps)."""
    roots = tuple(str(Path(u).resolve()) + os.sep for u in under)
    if not roots:
        return 0
    total, counting = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                header = _SMAPS_HEADER_RE.match(line)
                if header:
                    counting = header.group(1).startswith(roots)
                elif counting and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


class _Poller:
    """Calls `sample` every `interval_s` on a daemon thread between `start()` and `stop()`."""

    def __init__(self, sample, interval_s: float, name: str) -> None:
        self.sample, self.interval_s, self.name = sample, interval_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class HeldMemoryMeter:
    """The memory a block of code makes this process hold: anonymous and shared-memory pages (heap, allocator
    pools, memfd-backed KV) plus the resident pages of the files under `files_under` (a model's mapped
    weights). Pages of other mapped files, i.e. shared libraries' code, are left out.

    Why leave them out: they are clean page cache the kernel can drop and re-read at will, and how many of them
    a fault maps depends on the page cache, not on the program (the kernel's fault-around maps the neighbouring
    pages that happen to be cached, and a file cached in large folios maps more). Measured on this machine: the
    runtime's share of memfit-tiny came to 44 MB in total RSS with libtorch as pip had written it into the cache,
    and 26 MB after evicting it, for the same code. The calibration measured on one and `fitcheck` on the other
    disagreed by 30%.

    The peak: a thread samples the anonymous+shared part every `interval_s` (a short peak can slip between
    samples), and the kernel's VmHWM (reset on entry) bounds it from below exactly: library pages only grow
    while the block runs, so VmHWM minus the library pages at the end is at most the held peak. `peak_bytes`
    is the larger of the two. Linux only (elsewhere: total RSS).

        with HeldMemoryMeter(files_under=[model_dir]) as m:
            run()
        m.end_delta_bytes, m.peak_delta_bytes
    """

    def __init__(self, files_under: Iterable[str | os.PathLike] = (), interval_s: float = 0.001) -> None:
        self.files_under = list(files_under)
        self.interval_s = interval_s
        self.baseline_bytes = self.end_bytes = self.peak_bytes = 0
        self._sampled_peak = 0
        self._poller = _Poller(self._sample, interval_s, "memfit-held-memory")

    @staticmethod
    def _anon_shmem() -> int:
        held = anon_shmem_bytes()
        return rss_bytes() if held is None else held

    def held_bytes(self) -> int:
        """Held now: anonymous + shared memory + the resident pages of `files_under`."""
        return self._anon_shmem() + mapped_file_rss_bytes(self.files_under)

    def _sample(self) -> None:
        self._sampled_peak = max(self._sampled_peak, self._anon_shmem())

    def __enter__(self) -> HeldMemoryMeter:
        self._hwm = reset_peak_rss()
        self.baseline_bytes = self.held_bytes()
        self._sampled_peak = self._anon_shmem()
        self._checked_peak = 0
        self._poller.start()
        return self

    def _hwm_bounded_peak(self, st: dict[str, int], files: int) -> int:
        """The held peak since the last VmHWM reset, from below: VmHWM less the library pages now (which only
        grow), or the held bytes now where VmHWM cannot be reset."""
        held_now = self._anon_shmem() + files
        if self._hwm and "RssFile" in st:
            return max(held_now, st["VmHWM"] - (st["RssFile"] - files))
        return held_now

    def checkpoint(self) -> int:
        """The held peak since entry or the previous checkpoint, as bytes added since entry, then reset the
        kernel's mark so the next checkpoint sees only what follows.

        Unlike the sampler, VmHWM misses no short peak and does not depend on how often this thread gets a
        core, so a caller that checkpoints after each step (calibration) gets each step's own peak exactly,
        whatever the load. The meter's `peak_bytes` still covers the whole block."""
        st = status_bytes()
        peak = self._hwm_bounded_peak(st, mapped_file_rss_bytes(self.files_under))
        self._checked_peak = max(self._checked_peak, peak)
        self._hwm = reset_peak_rss()
        return peak - self.baseline_bytes

    def __exit__(self, *exc: object) -> None:
        self._poller.stop()
        st = status_bytes()
        files = mapped_file_rss_bytes(self.files_under)
        self.end_bytes = self._anon_shmem() + files
        sampled = max(self._sampled_peak, self.end_bytes - files) + files
        sampled = max(sampled, self._hwm_bounded_peak(st, files), self._checked_peak)
        self.peak_bytes = max(sampled, self.end_bytes)

    @property
    def end_delta_bytes(self) -> int:
        return self.end_bytes - self.baseline_bytes

    @property
    def peak_delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)


def cuda_memory(device: Any = None) -> dict[str, int]:
    """The CUDA caching allocator's counters for `device` (default: the current one), in bytes:
    allocated, reserved, peak_allocated, peak_reserved, plus free and total device memory.
    {} when CUDA is not available (torch is imported only if it is already loaded or installed)."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated_bytes": int(torch.cuda.memory_allocated(device)),
        "reserved_bytes": int(torch.cuda.memory_reserved(device)),
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        "free_bytes": int(free),
        "total_bytes": int(total),
    }


class PeakRSSSampler:
    """Measure the peak RSS inside a `with` block.

    A daemon thread reads RSS every `interval_s`; a peak that lasts less than that can slip between two
    samples, and the thread needs the GIL (a long C call that holds it delays sampling). With
    `use_hwm=True` (default) the kernel's VmHWM is also reset on entry and read on exit, which sees every
    peak exactly, on Linux; note that the reset is process-wide, so nested samplers or other users of
    `peak_rss_bytes` see the reset too. `.peak_bytes` is the larger of the two.

        with PeakRSSSampler() as s:
            run()
        print(s.peak_bytes - s.baseline_bytes)
    """

    def __init__(self, interval_s: float = 0.002, use_hwm: bool = True) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.interval_s = interval_s
        self.use_hwm = use_hwm
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.sampled_peak_bytes = 0  # from polling alone
        self.hwm_used = False  # True when VmHWM could be reset and was read
        self.num_samples = 0
        self._poller = _Poller(self._sample, interval_s, "memfit-peak-rss")

    @property
    def peak_delta_bytes(self) -> int:
        """How far the block took RSS above where it started."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    def _sample(self) -> None:
        rss = rss_bytes()
        self.num_samples += 1
        self.sampled_peak_bytes = max(self.sampled_peak_bytes, rss)

    def __enter__(self) -> PeakRSSSampler:
        self.hwm_used = self.use_hwm and reset_peak_rss()
        self.baseline_bytes = rss_bytes()
        self.sampled_peak_bytes = self.baseline_bytes
        self.num_samples = 0
        self._sample()
        self._poller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poller.stop()
        self._sample()
        self.peak_bytes = self.sampled_peak_bytes
        if self.hwm_used:
            self.peak_bytes = max(self.peak_bytes, peak_rss_bytes())


def cpu_fields() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as {key: value} ("model name", "cpu family", "model", "flags",
    ...); {} where there is none. A virtual machine's model name can be as bare as "AMD EPYC": family and model say
    which generation it is (benchmark JSONs record them; the cost model picks a host's labels by them)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {}
    return fields


def machine_info(threads: int, seed: int | None = None, **extra: object) -> dict:
    """What a benchmark's JSON must state so its figures can be compared: machine, versions, threads, seed."""
    import platform

    import torch

    # family/model and the vector units say which generation ran a figure (the development machine changes between
    # sessions; results differ by host)
    first = cpu_fields()
    cpu = first.get("model name", platform.processor())
    ident: dict[str, object] = {}
    if first:
        flags = set(first.get("flags", "").split())
        ident = {"cpu_family": first.get("cpu family"), "cpu_model": first.get("model"),
                 "cpu_vector_units": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
                                                      "amx_bf16", "avx_vnni"})}
    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, **ident, "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": threads, "seed": seed, **extra,
    }
