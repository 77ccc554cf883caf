"""Memory probes and a memory timeline.

Probes: `rss_bytes` (resident set now), `peak_rss_bytes` (the kernel's high-water mark), `reset_peak_rss`
(Linux: writing "5" to /proc/self/clear_refs resets VmHWM, kernel >= 4.0), `HeldMemoryMeter` (anonymous and
shared memory plus given mapped files: what a block holds, without the library pages whose count depends on
the page cache), `cuda_memory` (the caching
allocator's counters) and `PeakRSSSampler`, a context manager that polls RSS from a background thread to
catch a transient peak inside a block (and also reads VmHWM when it can be reset, which catches peaks
shorter than the polling interval).

`MemoryTimeline` records one row per engine step (KV committed / used / waste bytes, tokens held, RSS,
queue lengths ...) and writes it as JSON lines, a PNG plot, or a Chrome trace-event file that Perfetto
(ui.perfetto.dev) and chrome://tracing open as counter tracks.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import sys
import threading
import time
import weakref
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


# -- timeline ----------------------------------------------------------------------------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))


class MemoryTimeline:
    """Per-step memory rows: {"step", "time_s", "rss_bytes", **fields}.

    `record(**fields)` numbers the step (unless `step=` is given), stamps `time_s` (monotonic seconds since
    the timeline was created) and `rss_bytes` (unless given, or `track_rss=False`). Fields named `*_bytes`
    are plotted in MiB; other numeric fields (counts) on a second axis. With `jsonl_path`, each row is
    also appended to that file and flushed as it is recorded, so a long run can be watched (`tail -f`).
    Thread-safe: an engine loop and a server thread may both record.
    """

    def __init__(self, jsonl_path: str | os.PathLike | None = None, *, track_rss: bool = True,
                 append: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.track_rss = track_rss
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._file = None
        if jsonl_path is not None:
            path = Path(jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (held open)
            self._finalizer = weakref.finalize(self, self._file.close)

    # recording ---------------------------------------------------------------------------------------

    def record(self, **fields: Any) -> dict[str, Any]:
        """Add one row; returns it. Values should be JSON-serialisable (numbers for plotting/tracing)."""
        now = time.monotonic() - self._t0
        rss = rss_bytes() if self.track_rss and "rss_bytes" not in fields else None
        with self._lock:
            row: dict[str, Any] = {"step": fields.pop("step", len(self.rows)), "time_s": round(now, 6)}
            if rss is not None:
                row["rss_bytes"] = rss
            row.update(fields)
            self.rows.append(row)
            if self._file is not None:
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()
        return row

    def close(self) -> None:
        """Close the streaming file (if any); recording afterwards keeps rows in memory only."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MemoryTimeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.rows)

    def fields(self) -> list[str]:
        """Numeric fields seen in any row (besides step and time_s), in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for key, value in row.items():
                if key not in ("step", "time_s") and _is_number(value) and not isinstance(value, bool):
                    seen.setdefault(key, None)
        return list(seen)

    # JSON lines --------------------------------------------------------------------------------------

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """All rows, one JSON object per line."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        return path

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike) -> MemoryTimeline:
        """A timeline holding the rows of a JSON-lines file (blank lines skipped)."""
        timeline = cls(track_rss=False)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object: {e.msg}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
                timeline.rows.append(row)
        return timeline

    # PNG ---------------------------------------------------------------------------------------------

    def plot(self, path_png: str | os.PathLike, fields: Iterable[str] | None = None, *,
             x: str = "time_s", title: str = "memory timeline") -> Path:
        """Draw the timeline: `*_bytes` fields in MiB on the left axis, other (count) fields on the right.
        KV committed is the outer line, used the filled area under it, waste the dashed line."""
        return _plot_rows(self.rows, Path(path_png), list(fields) if fields else self.fields(), x, title)

    # Perfetto ----------------------------------------------------------------------------------------

    def to_perfetto(self, path: str | os.PathLike, process_name: str = "memfit") -> Path:
        """Chrome trace-event JSON: one counter track ("ph": "C") per numeric field, one event per row,
        timestamps in microseconds. Byte counts are written as bytes (the track name says so)."""
        pid = os.getpid()
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process_name}},
        ]
        names = self.fields()
        for row in self.rows:
            ts = float(row.get("time_s", 0.0)) * 1e6
            for name in names:
                value = row.get(name)
                if _is_number(value) and not isinstance(value, bool):
                    events.append({"name": name, "ph": "C", "ts": ts, "pid": pid, "tid": 0, "args": {name: value}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path


# -- plotting ----------------------------------------------------------------------------------------------

# How the KV fields read at a glance: committed is the envelope, used fills under it, waste is the gap.
_STYLES: dict[str, dict[str, Any]] = {
    "kv_committed_bytes": {"color": "tab:blue", "linewidth": 2.0, "label": "KV committed"},
    "kv_used_bytes": {"color": "tab:green", "linewidth": 1.2, "label": "KV used", "fill": True},
    "kv_waste_bytes": {"color": "tab:red", "linewidth": 1.2, "linestyle": "--", "label": "KV waste"},
    "rss_bytes": {"color": "tab:gray", "linewidth": 1.0, "linestyle": ":", "label": "process RSS"},
}
_MIB = 1024.0**2


def _plot_rows(rows: list[dict[str, Any]], path: Path, fields: list[str], x: str, title: str) -> Path:
    # The object-oriented API with an Agg canvas: no pyplot, so the caller's matplotlib backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if x not in ("time_s", "step"):
        raise ValueError(f"x must be 'time_s' or 'step', got {x!r}")
    unknown = [f for f in fields if not any(f in r for r in rows)]
    if unknown:
        raise ValueError(f"no row has the field(s) {unknown}; recorded fields: {sorted({k for r in rows for k in r})}")
    fig = Figure(figsize=(10, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    byte_fields = [f for f in fields if f.endswith("_bytes")]
    count_fields = [f for f in fields if not f.endswith("_bytes")]
    # draw order: used (filled) under committed, then the rest
    byte_fields.sort(key=lambda f: list(_STYLES).index(f) if f in _STYLES else len(_STYLES))

    def series(name: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
        pts = [(float(r[x]), float(r[name]) / scale) for r in rows if x in r and _is_number(r.get(name))]
        return [p[0] for p in pts], [p[1] for p in pts]

    for name in byte_fields:
        xs, ys = series(name, _MIB)
        style = dict(_STYLES.get(name, {"linewidth": 1.2, "label": name.removesuffix("_bytes")}))
        fill = style.pop("fill", False)
        (line,) = ax.plot(xs, ys, drawstyle="steps-post", **style)
        if fill:
            ax.fill_between(xs, ys, step="post", alpha=0.25, color=line.get_color(), linewidth=0)
    ax.set_xlabel("time (s)" if x == "time_s" else "engine step")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if count_fields:
        ax2 = ax.twinx()
        for i, name in enumerate(count_fields):
            xs, ys = series(name)
            ax2.plot(xs, ys, drawstyle="steps-post", linewidth=0.9, alpha=0.8, color=f"C{(i + 4) % 10}", label=name)
        ax2.set_ylabel("count")
        ax2.set_ylim(bottom=0)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper left", fontsize=8, framealpha=0.85)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def machine_info(threads: int, seed: int | None = None, **extra: object) -> dict:
    """What a benchmark's JSON must state so its figures can be compared: machine, versions, threads, seed."""
    import os
    import platform

    import psutil
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": threads, "seed": seed, **extra,
    }
