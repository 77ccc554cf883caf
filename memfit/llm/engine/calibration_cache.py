"""The calibration cache ($MEMFIT_CACHE/runtime.json, default ~/.cache/memfit): what calibrate.py and
onednn_kernels.py measure once per machine and build, keyed by memfit's version and a digest of its engine code,
torch's version, the CPU model, and the device, dtype and backend choices. Imports nothing of the engine, so the
accounting modules can read it without a cycle."""
from __future__ import annotations

import json
import os
import platform
import threading
from pathlib import Path


def cache_path() -> Path:
    return Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit")) / "runtime.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_digest() -> str:
    """A digest of the engine's own code (Python and C++): a measurement made with other kernels is stale."""
    import hashlib

    import memfit

    root = Path(memfit.__file__).parent
    h = hashlib.sha256()
    for sub in ("llm", "memory"):
        for path in sorted((root / sub).rglob("*")):
            if path.suffix in (".py", ".cpp", ".h") and path.is_file():
                h.update(path.relative_to(root).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(device_type: str, dtype: str, cpu_linear: str | None, cpu_kernels: bool) -> str:
    import torch

    import memfit
    from memfit.llm.kernels.build import isa_cap

    return "|".join([memfit.__version__, _source_digest(), torch.__version__, platform.machine(), _cpu_model(),
                     isa_cap(), device_type, dtype, str(cpu_linear), str(bool(cpu_kernels))])


def read_cache() -> dict:
    """The calibration cache ({} where it is missing or unreadable)."""
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def write_cache_entry(key: str, entry: dict) -> None:
    """Add one entry to the cache, replacing the file at once. Processes that measure at the same time (a server
    and a `memfit fit`) take turns on a lock file, so neither drops the other's entry (where locks work: POSIX).
    Best effort: a read-only home just measures again next time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            _lock(lock)
            cache = read_cache()  # read under the lock: what another process wrote since is kept
            cache[key] = entry
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
    except OSError:
        pass


def _lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: unlocked, as before
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
