"""Tile-aware features of one tuning candidate: an f32 matmul (M, N, K) compiled with a vector tile (tm, tn, tk)
through IREE's lowering config (DoubleTilingExpert, distribution tile 64x64). They describe what the tile does
to this shape on the host's vector unit, which whole-kernel features (FLOPs, bytes) cannot tell apart between
the candidates of one shape: padding waste of M/N/K against the tile, how many tiles, the vector registers the
tile needs against the host's (32 zmm with AVX-512, 16 ymm with AVX2), and the footprint of its A/B/C panels
against the host's L1 and L2. The host is read from the CPU (`this_host`) and recorded in a ranker's file."""
from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.ops import linalg_ops
from memfit.plan.cost.parse import Function

_VEC = re.compile(r"vector_common_parallel\s*=\s*\[(\d+),\s*(\d+)")
_RED = re.compile(r"vector_reduction\s*=\s*\[\s*\d+\s*,\s*\d+\s*,\s*(\d+)\s*\]")
DIST = 64  # the distribution (workgroup) tile of kernels.compilation_info, in M and N


@dataclass(frozen=True)
class Host:
    """What the features measure against. The defaults are the AVX-512 Xeon the first ranker was trained on
    (rankers saved before hosts were recorded are read as trained there)."""

    vector_regs: int = 32        # zmm0-31
    lanes: int = 16              # f32 per zmm
    l1_bytes: int = 48 * 1024    # L1d per core
    l2_bytes: int = 2 << 20      # L2 per core
    elem_bytes: int = 4          # f32

    @classmethod
    def detect(cls, cpuinfo: str | None = None, cache_dir: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> "Host":
        """This CPU's vector registers and f32 lanes (from its flags: avx512f, else avx2, else SSE) and L1d/L2
        sizes (from sysfs); a value that can't be read keeps the default."""
        if cpuinfo is None:
            try:
                cpuinfo = Path("/proc/cpuinfo").read_text()
            except OSError:
                cpuinfo = ""
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
        regs, lanes = (cls.vector_regs, cls.lanes) if flags is None else (
            (32, 16) if "avx512f" in flags else (16, 8) if "avx2" in flags else (16, 4))
        sizes = {}
        for index in sorted(Path(cache_dir).glob("index*")):
            try:
                level, kind = int((index / "level").read_text()), (index / "type").read_text().strip()
                size = _cache_bytes((index / "size").read_text().strip())
            except (OSError, ValueError):
                continue
            if kind in ("Data", "Unified") and level in (1, 2):
                sizes[level] = size
        return cls(regs, lanes, sizes.get(1, cls.l1_bytes), sizes.get(2, cls.l2_bytes))


def _cache_bytes(text: str) -> int:
    """sysfs cache sizes: "32K", "512K", "2048K", "1M"."""
    unit = {"K": 1024, "M": 1 << 20}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KkMm")) * unit


@functools.lru_cache(maxsize=1)
def this_host() -> Host:
    return Host.detect()


NAMES = ("log_m", "log_n", "log_k", "tm", "tn", "tk", "log_tm", "log_tn", "log_tk",
         "pad_m", "pad_n", "pad_k", "pad_work", "divides_m", "divides_n", "divides_k", "divides_all",
         "rem64_m", "rem64_n", "m_lt_tm", "log_tiles", "log_tiles_per_wg",
         "acc_regs", "b_regs", "regs_needed", "regs_over", "reg_ratio", "reuse", "k1",
         "log_vector_bytes", "log_tile_set_l1", "log_panel_l1", "log_panel_l2", "log_wg_l2",
         "log_k_panel_bytes", "rem_m", "rem_n", "rem_k", "log_fma_eff", "loads_per_fma", "log_est_insts",
         "log_est_cycles", "spill_traffic")


def shape_and_tile(fn: Function) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """(M, N, K) of the function's first linalg.matmul and its vector tile (None: IREE's default)."""
    mm = [o for o in linalg_ops(fn) if o.short == "matmul"]
    if not mm:
        raise CostModelError("the tile ranker needs a linalg.matmul")
    op = mm[0]
    m, k = op.ins[0].shape[-2:]
    n = op.outs[0].shape[-1]
    vec, red = _VEC.search(fn.body), _RED.search(fn.body)
    tile = (int(vec.group(1)), int(vec.group(2)), int(red.group(1)) if red else 1) if vec else None
    return (m, n, k), tile


def _pad(size: int, t: int) -> float:
    """Fraction of padded (wasted) work when `size` is covered by whole tiles of `t`."""
    return math.ceil(size / t) * t / size - 1.0


def features(m: int, n: int, k: int, tile: tuple[int, int, int], host: Host | None = None) -> dict[str, float]:
    """The NAMES features of one candidate against `host` (this CPU by default)."""
    host = host or this_host()
    tm, tn, tk = tile
    l2 = math.log2
    eb = host.elem_bytes
    # registers of an outer-product lowering of the (tm, tn, tk) contraction: the C accumulator tile, the B
    # rows of the unrolled k steps, the A elements broadcast (one register each, at least one live)
    acc = tm * math.ceil(tn / host.lanes)
    b = tk * math.ceil(tn / host.lanes)
    need = acc + b + min(tm * tk, host.vector_regs)
    tiles = math.ceil(m / tm) * math.ceil(n / tn) * math.ceil(k / tk)
    tile_set = (tm * tk + tk * tn + tm * tn) * eb          # one vector step's A, B and C tiles
    panel = (tm * k + k * tn + tm * tn) * eb               # a C tile's whole A row panel and B column panel
    wg = (min(m, DIST) * k + k * min(n, DIST) + min(m, DIST) * min(n, DIST)) * eb  # a workgroup's panels
    # an instruction estimate of the lowered loops: per (tm x tn) tile and per k-step of tk, tm*tk broadcasts
    # of A, tk*ceil(tn/lanes) loads of B and tm*tk*ceil(tn/lanes) FMAs, over the padded iteration space; the C
    # tile is loaded and stored once per tile; registers beyond the host's spill once per k-step
    vn = math.ceil(tn / host.lanes)
    mn_tiles = math.ceil(m / tm) * math.ceil(n / tn)
    ksteps = math.ceil(k / tk)
    fma = mn_tiles * ksteps * tm * tk * vn
    loads = mn_tiles * ksteps * (tm * tk + tk * vn) + mn_tiles * 2 * tm * vn
    spill = mn_tiles * ksteps * 2 * max(0, need - host.vector_regs)
    ideal = m * n * k / host.lanes
    # cycles: 2 FMA ports and 2 load ports (spills are loads and stores too)
    cycles = max(fma / 2, (loads + spill) / 2)
    return {
        "rem_m": ((m % DIST) % tm) / m, "rem_n": ((n % DIST) % tn) / n, "rem_k": (k % tk) / k,
        "log_fma_eff": l2(fma / ideal), "loads_per_fma": (loads + spill) / fma,
        "log_est_insts": l2((fma + loads + spill) / ideal), "log_est_cycles": l2(cycles / ideal),
        "spill_traffic": spill / fma,
        "log_m": l2(m), "log_n": l2(n), "log_k": l2(k), "tm": tm, "tn": tn, "tk": tk,
        "log_tm": l2(tm), "log_tn": l2(tn), "log_tk": l2(tk),
        "pad_m": _pad(m, tm), "pad_n": _pad(n, tn), "pad_k": _pad(k, tk),
        "pad_work": (1 + _pad(m, tm)) * (1 + _pad(n, tn)) * (1 + _pad(k, tk)) - 1.0,
        "divides_m": float(m % tm == 0), "divides_n": float(n % tn == 0), "divides_k": float(k % tk == 0),
        "divides_all": float(m % tm == 0 and n % tn == 0 and k % tk == 0),
        # the last (partial) workgroup's rows/columns: a vector tile that does not divide them is peeled
        "rem64_m": float((m % DIST) % tm != 0), "rem64_n": float((n % DIST) % tn != 0),
        "m_lt_tm": float(m < tm or n < tn),
        "log_tiles": l2(tiles), "log_tiles_per_wg": l2(math.ceil(min(m, DIST) / tm) * math.ceil(min(n, DIST) / tn)),
        "acc_regs": acc, "b_regs": b, "regs_needed": need, "regs_over": max(0, need - host.vector_regs),
        "reg_ratio": need / host.vector_regs,
        "reuse": tm * tn / (tm + tn),                      # FMAs per element loaded from A and B
        "k1": float(tk == 1),
        "log_vector_bytes": l2(tm * tn * tk * eb),         # IREE rejects vectors of 32 KiB
        "log_tile_set_l1": l2(tile_set / host.l1_bytes), "log_panel_l1": l2(panel / host.l1_bytes),
        "log_panel_l2": l2(panel / host.l2_bytes), "log_wg_l2": l2(wg / host.l2_bytes),
        "log_k_panel_bytes": l2(k * tn * eb),
    }


def vector(m: int, n: int, k: int, tile: tuple[int, int, int], host: Host | None = None) -> list[float]:
    f = features(m, n, k, tile, host)
    return [float(f[name]) for name in NAMES]


# IREE's default for a shape has no tile: what decides between it and the tiles is the shape alone
SHAPE_NAMES = ("log_m", "log_n", "log_k", "log_mnk", "div16_m", "div16_n", "div16_k", "rem64_m", "rem64_n",
               "rem16_k")


def shape_vector(m: int, n: int, k: int) -> list[float]:
    """Shape-only features (SHAPE_NAMES) of an (M, N, K) matmul, for the tile-or-default switch."""
    l2 = math.log2
    return [l2(m), l2(n), l2(k), l2(m * n * k), float(m % 16 == 0), float(n % 16 == 0), float(k % 16 == 0),
            (m % DIST) / DIST, (n % DIST) / DIST, (k % 16) / 16]


def host_info(host: Host | None = None) -> dict:
    return asdict(host or this_host())
