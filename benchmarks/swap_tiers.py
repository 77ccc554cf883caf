"""The host swap tier's own copy rate, without a model: what issue 15's "swap throughput at least 50% of the tier's
bandwidth" asks of the tier itself.

benchmarks/preemption.py reports the tier's rate inside a serving run, where on a 2-core CPU the model's compute
and the Python around it share the cores with the copies (a swap thread waits for a CPU and for the GIL), so the
fraction it reports moves with the load. Here a sequence's KV goes out to the host tier and back through the
engine's own code (`SwapSpace.try_swap_out` / `swap_in` on a `VirtualKVCache`, per-layer layout, synchronous) and
nothing else runs:
- `out T` / `in T`: a sequence of T tokens swapped out whole (a fresh host chunk) and back in;
- `out +n`: with cross-turn reuse (`reuse=True`), the swap-out after n new tokens, which copies only those (the
  copies a multi-turn conversation's swaps mostly are: 48 segments of 16-48 tokens at the 0.5B shape);
- `in after +n`: the swap-in that follows it (the two held chunks: the history's and the new tokens').
Each mode swaps one sequence over and over on its own cache (3 warm-up rounds, then `--reps`), as an engine does.
With `--ssd-dir`, also `ssd out T` / `ssd in T`: the sequence spilled straight to the SSD tier (a host tier too
small for it) and read back (O_DIRECT, checksummed, the tier's C loop), against O_DIRECT 4 MiB writes and reads
of a file in the same directory (`benchmarks.preemption.ssd_bandwidth`, before and after), at the C loop's depths
taking turns (`--ssd-depths 4 2 1`: 4, the default, gathers or scatters a quarter of the stage while the others'
I/Os are in flight, 2 a half; 1 moves one whole stage at a time); `--skip-host` runs these rows alone, and
`--ssd-views` adds the first depth with the KV runs named by a torch view each (`runs: views`, the tier before it
took them by address, SwapRuns.addresses), reported as `ssd_views_call_time_over_address`.
`--modes full full-trim` (issue 15's high-water mark): `out T` / `in T` on a region whose tier budget holds exactly
its tables and one chunk of T tokens, so after the first round every swap-out finds the tier full of the warm pages
the last swap-in left. `full` is the engine's reservation (the shortfall's warm pages lend their reservation to the
chunk, which is carved from them); `full-trim` the reservation before that fix (the shortfall's warm pages given
back, MADV_DONTNEED, then reserved for the chunk, which faults them in again). Their ratio is
`full_trim_over_full_call_time`; the reuse ops are not run in these modes.
Each is timed around the call (the tier's planning, the host buffer's allocation and the copies: what a step
waits for) and by the tier's own copy timer (`SwapStats`, what preemption.py's fraction uses). Two ways of
copying take turns in every round: `stacked`, the default, a chunk's runs of every segment as one (segments, bytes)
view and one copy (`SwapRuns.stacked`), and `runs`, a view and a copy a run (`stacking` off: the code before it,
and what the paged cache and the per-block baseline do). (A third, a view a run and all a swap's copies in one
`torch._foreach_copy_`, ran level with `runs` in a trial of this benchmark and was not kept.) `address`: stacked,
each segment's row copied by address, all in one C call (kernels/copy_rows.py), the engine's default (kv/swap.py
BY_ADDRESS_MAX); `address-memmove` the same rows a `ctypes.memmove` each, as before that call
(`memmove_over_one_call_call_time`); every other mode turns rows by address off, so they measure what they
measured before it.
The reference is this machine's memcpy (64 MiB, best of 5, `benchmarks.preemption.memcpy_bandwidth`) measured in
the same process before and after; small copies from cache can beat it.

    OMP_NUM_THREADS=1 python -m benchmarks.swap_tiers --shapes tiny 0.5b --ssd-dir /tmp --out benchmarks/results/swap_tiers.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import emit, header, pin_threads, preset_threads

SHAPES = {  # (layers, KV heads, head dim, dtype): memfit-tiny (bf16) and the random shapes preemption.py runs (fp32)
    "tiny": (2, 2, 32, "bfloat16"),
    "0.1b": (12, 4, 64, "float32"),
    "0.5b": (24, 2, 64, "float32"),
}
OPS = ("out T", "in T", "out +n", "in after +n")


def _cache(shape: str, max_len: int):
    """(layout, a virtual cache of two sequences of `max_len` tokens of `shape`)."""
    import torch

    from memfit.llm.kv.base import KVLayout
    from memfit.llm.kv.virtual import VirtualKVCache
    from memfit.memory.budget import MemoryBudget

    layers, heads, dim, dtype = SHAPES[shape]
    layout = KVLayout(layers, heads, dim, getattr(torch, dtype), max_len)
    return layout, VirtualKVCache(layout, MemoryBudget(4 * max_len * layout.bytes_per_token, name="kv_budget"),
                                  max_seqs=2, eager_pages=0)


def _cache_and_swap(shape: str, max_len: int, reuse: bool, region: bool = False, full_at: int | None = None):
    """(layout, cache, swap); `full_at`: the tier's budget holds exactly its region's tables and a chunk of that
    many tokens (the high-water mark once a swap-in has left the chunk's pages warm)."""
    from memfit.llm.kv.swap import SwapSpace
    from memfit.memory.budget import MemoryBudget, Tier

    layout, cache = _cache(shape, max_len)
    limit = 16 * max_len * layout.bytes_per_token
    if full_at is not None:
        from memfit.llm.kv.swap_layout import SwapRuns
        from memfit.memory.extent_map import extent_bytes
        from memfit.memory.host_region import budget_for

        limit = budget_for(extent_bytes(SwapRuns(cache).shape(full_at)[0]))  # the tables and one chunk, exactly
    swap = SwapSpace(cache, MemoryBudget(limit, Tier.HOST, name="swap_space"), reuse=reuse, region=region)
    return layout, cache, swap


def _trim_then_reserve(book):
    """The host tier's reservation before issue 15's fix (a benchmark's rival, not the engine's code): the
    shortfall's warm pages given back, then the chunk reserved, so its take faults them in again."""
    from memfit.llm.kv.swap_model import OWNER

    def try_reserve(nbytes: int) -> bool:
        return book.budget.try_reserve(nbytes, OWNER) or (
            book.region.trim(nbytes - book.budget.free_bytes) > 0 and book.budget.try_reserve(nbytes, OWNER))

    return try_reserve


def _write(cache, layout, seq_id: int, start: int, n: int) -> None:
    import torch

    from memfit.llm.kv.base import SeqStep

    plan = cache.plan_step([SeqStep(seq_id, start, n)])
    for layer in range(layout.num_layers):
        k = torch.randn(n, layout.num_kv_heads, layout.head_dim).to(layout.dtype)
        cache.write(layer, plan, k, -k)


MODES = ("stacked", "runs", "region", "full", "full-trim", "address", "address-memmove")  # region: stacked, the chunks from the engine's HostRegion
# (kept warm); full, full-trim: region at its high-water mark, the engine's reservation and the one before issue 15's fix
FULL = ("full", "full-trim")
DEFAULT_MODES = ("stacked", "runs")


class Rig:
    """One shape's cache and host tiers in one copy mode, swapping one sequence over and over (a serving engine
    swaps on the same cache all day: its allocator and caches are warm), `cycle` timing the four ops once each."""

    def __init__(self, shape: str, tokens: int, new: int, mode: str) -> None:
        self.tokens, self.new = tokens, new
        self.one_call = mode != "address-memmove"  # (address-memmove: a memmove a row, as before the one C call)
        full = mode in FULL
        self.whole = _cache_and_swap(shape, tokens + new + 16, reuse=False, region=mode == "region" or full,
                                     full_at=tokens if full else None)
        if mode == "full-trim":
            self.whole[2].book.try_reserve = _trim_then_reserve(self.whole[2].book)
        self.reuse = None if full else _cache_and_swap(shape, tokens + new + 16, reuse=True, region=mode == "region")
        for layout, cache, swap in (self.whole, self.reuse) if self.reuse is not None else (self.whole,):
            swap.run_map.stacking = mode != "runs"
            swap.by_address = mode.startswith("address")  # the others as measured before rows went by address
            assert cache.try_allocate(1, tokens + new)
            _write(cache, layout, 1, 0, tokens)
        if self.reuse is None:
            return
        layout, cache, swap = self.reuse
        assert swap.try_swap_out(1, tokens)  # the history, held and kept after its swap-in
        cache.free(1)
        assert cache.try_allocate(1, tokens + new) and swap.swap_in(1) == tokens
        _write(cache, layout, 1, tokens, new)  # the turn's new tokens

    def cycle(self) -> dict[str, tuple[float, float, int, int]]:
        """{op: (seconds around the call, seconds the tier's copy timer counted, bytes, copies)}."""
        from memfit.llm.kernels.copy_rows import set_one_call

        before = set_one_call(self.one_call)
        try:
            return self._cycle()
        finally:
            set_one_call(before)

    def _cycle(self) -> dict[str, tuple[float, float, int, int]]:
        out: dict[str, tuple[float, float, int, int]] = {}

        def timed(name: str, swap, fn) -> None:
            st = swap.stats
            s0, b0, o0 = st.seconds_sum, st.out_bytes + st.in_bytes, st.out_ops + st.in_ops
            t0 = time.perf_counter()
            assert fn()
            wall = time.perf_counter() - t0
            out[name] = (wall, st.seconds_sum - s0, st.out_bytes + st.in_bytes - b0, st.out_ops + st.in_ops - o0)

        t, n = self.tokens, self.new
        layout, cache, swap = self.whole
        timed("out T", swap, lambda: swap.try_swap_out(1, t))
        cache.free(1)
        assert cache.try_allocate(1, t + n)
        timed("in T", swap, lambda: swap.swap_in(1) == t)
        if self.reuse is None:
            return out
        layout, cache, swap = self.reuse
        timed("out +n", swap, lambda: swap.try_swap_out(1, t + n))
        cache.free(1)
        assert cache.try_allocate(1, t + n)
        timed("in after +n", swap, lambda: swap.swap_in(1) == t + n)
        swap.truncate(1, t)  # the next turn rewrites its n tokens: the held copy keeps 0..t-1
        cache.truncate(1, t)
        _write(cache, layout, 1, t, n)
        return out

    def close(self) -> None:
        for _, cache, swap in (self.whole, self.reuse) if self.reuse is not None else (self.whole,):
            swap.close()
            cache.close()


class SSDRig:
    """A sequence swapped out to the SSD tier and back (a host tier too small for it: the swap-out spills straight
    to the SSD tier, as the engine's does when the host tier is full), synchronously, over and over."""

    def __init__(self, shape: str, tokens: int, directory: str) -> None:
        from memfit.llm.kv.swap import SwapSpace
        from memfit.llm.kv.swap_ssd import SSDTier
        from memfit.memory.budget import MemoryBudget, Tier

        self.tokens = tokens
        self.layout, self.cache = _cache(shape, tokens + 16)
        self.ssd = SSDTier(directory, 4 * tokens * self.layout.bytes_per_token + (8 << 20), threads=0)
        self.swap = SwapSpace(self.cache, MemoryBudget(4096, Tier.HOST, name="swap_space"), ssd=self.ssd)
        assert self.cache.try_allocate(1, tokens)
        _write(self.cache, self.layout, 1, 0, tokens)

    def cycle(self) -> dict[str, tuple[float, int, int]]:
        """{op: (seconds around the call, bytes the SSD tier moved, its I/O calls)}."""
        out: dict[str, tuple[float, int, int]] = {}
        st = self.ssd.stats

        def timed(name: str, fn) -> None:
            b0, o0, t0 = st.out_bytes + st.in_bytes, st.out_ops + st.in_ops, time.perf_counter()
            assert fn()
            out[name] = (time.perf_counter() - t0, st.out_bytes + st.in_bytes - b0, st.out_ops + st.in_ops - o0)

        timed("ssd out T", lambda: self.swap.try_swap_out(1, self.tokens))
        self.cache.free(1)
        assert self.cache.try_allocate(1, self.tokens)
        timed("ssd in T", lambda: self.swap.swap_in(1) == self.tokens)
        return out

    def close(self) -> None:
        self.swap.close()
        self.cache.close()


def ssd_rows(shapes: list[str], tokens: list[int], reps: int, directory: str, depths: tuple[int, ...] = (4, 2, 1),
             views: bool = False) -> tuple[list[dict], list[dict], dict, dict]:
    """The SSD tier alone, against O_DIRECT 4 MiB writes and reads of a file in the same directory measured before
    and after (`benchmarks.preemption.ssd_bandwidth`; also 256 KiB ones four in flight, `in_flight`), at each of the C loop's depths (kernels/staged_io.py: 4 or
    2, a piece of the stage gathered or scattered while the others' I/Os are in flight; 1, one whole-stage I/O at
    a time), taking turns within every round; `views`: also at the first depth with the KV runs named by torch
    views (SSDTier.by_address off, the tier before it named them by address): (rows, the two references,
    {"<shape> T=<t> <op> depth <d>": its call time over the first depth's}, {"<shape> T=<t> <op>": the views'
    call time over by address's})."""
    from benchmarks.preemption import ssd_bandwidth
    from memfit.llm.kernels.staged_io import staged_io

    io = staged_io()
    if io is None:  # the Python loop, which has no depths
        depths = (0,)
    before = io.depth if io is not None else 0
    from memfit.memory.extent_store import STAGE

    def reference() -> dict:  # 4 MiB I/Os one at a time; and the C loop's quarters, four in flight
        return {**ssd_bandwidth(directory), "in_flight": {"piece_bytes": STAGE // 4, "depth": 4,
                                                         **ssd_bandwidth(directory, piece=STAGE // 4, depth=4)}}

    refs = [reference()]
    samples: dict[tuple[str, int, str, int, str], list[tuple[float, int, int]]] = {}
    settings = [(d, "address") for d in depths] + ([(depths[0], "views")] if views else [])
    try:
        for shape in shapes:
            for t in tokens:
                rig = SSDRig(shape, t, directory)
                for rnd in range(reps + 3):
                    for depth, runs in settings if rnd % 2 == 0 else settings[::-1]:
                        if io is not None:
                            io.set_depth(depth)
                        rig.ssd.by_address = runs == "address"
                        for op, v in rig.cycle().items():
                            if rnd >= 3:
                                samples.setdefault((shape, t, op, depth, runs), []).append(v)
                rig.close()
    finally:
        if io is not None:
            io.set_depth(before)
    refs.append(reference())
    rows = []
    for (shape, t, op, depth, runs), vs in samples.items():
        wall, nbytes, ios = statistics.median(v[0] for v in vs), vs[0][1], vs[0][2]
        key = "write_bytes_per_s" if op == "ssd out T" else "read_bytes_per_s"
        ref = statistics.median(r[key] for r in refs)
        ref_flight = statistics.median(r["in_flight"][key] for r in refs)
        rows.append({"shape": shape, "tokens": t, "op": op, "depth": depth, "runs": runs, "bytes": nbytes, "ios": ios,
                     "call_s": wall, "call_gb_s": nbytes / wall / 1e9, "reference_bytes_per_s": ref,
                     "call_fraction_of_o_direct": nbytes / wall / ref,
                     "in_flight_reference_bytes_per_s": ref_flight,
                     "call_fraction_of_o_direct_in_flight": nbytes / wall / ref_flight})
    by = {(r["shape"], r["tokens"], r["op"], r["depth"], r["runs"]): r["call_s"] for r in rows}
    ratios = {f"{s} T={t} {op} depth {d}": by[(s, t, op, d, n)] / by[(s, t, op, depths[0], n)]
              for (s, t, op, d, n) in by if d != depths[0] and n == "address"}
    view_ratios = {f"{s} T={t} {op}": by[(s, t, op, d, n)] / by[(s, t, op, d, "address")]
                   for (s, t, op, d, n) in by if n == "views"}
    return rows, refs, ratios, view_ratios


def main(argv: list[str] | None = None) -> dict:
    threads = preset_threads(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "0.5b"], choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 1024], help="T: the sequence swapped")
    ap.add_argument("--new", type=int, default=16, help="n: new tokens before the reuse swap-out")
    ap.add_argument("--reps", type=int, default=15, help="rounds; each runs every copy mode, the order alternating")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES,
                    help="region: stacked copies into buffers from the host tier's region (what the engine uses on a "
                         "CPU), against stacked's fresh torch buffer a chunk; full, full-trim: the region at its "
                         "high-water mark (out T / in T only), the engine's reservation and the one before issue 15's "
                         "fix (warm pages given back, then faulted in again)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ssd-dir", default=None, help="also the SSD tier alone, its file under this directory")
    ap.add_argument("--ssd-depths", nargs="+", type=int, default=[4, 2, 1], choices=[1, 2, 4],
                    help="the SSD tier's C loop at these depths, taking turns (4, the default, and 2: a quarter or "
                         "half of the stage copied while the others' I/Os are in flight; 1: one whole-stage I/O at a "
                         "time); call times are reported against the first")
    ap.add_argument("--ssd-views", action="store_true",
                    help="also the SSD tier at the first depth with its KV runs named by torch views, as before they "
                         "were named by address (ssd_views_call_time_over_address)")
    ap.add_argument("--skip-host", action="store_true", help="the SSD rows only (with --ssd-dir)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.reps < 1 or a.new < 1 or min(a.tokens) < 1:
        ap.error("--reps, --new and every --tokens must be at least 1")
    if a.skip_host and not a.ssd_dir:
        ap.error("--skip-host leaves only the SSD rows: give --ssd-dir")
    modes = () if a.skip_host else tuple(dict.fromkeys(a.modes))
    pin_threads(threads)
    from benchmarks.preemption import memcpy_bandwidth

    bw0 = memcpy_bandwidth()
    samples: dict[tuple[str, int, str, str], list[tuple[float, float, int, int]]] = {}
    for shape in a.shapes:
        for tokens in a.tokens:
            rigs = {mode: Rig(shape, tokens, a.new, mode) for mode in modes}
            for rnd in range(a.reps + 3):  # rounds 0-2: warm-up, not kept
                for mode in modes if rnd % 2 == 0 else modes[::-1]:
                    for op, v in rigs[mode].cycle().items():
                        if rnd >= 3:
                            samples.setdefault((shape, tokens, op, mode), []).append(v)
            for rig in rigs.values():
                rig.close()
    bw1 = memcpy_bandwidth()
    bw = statistics.median([bw0, bw1])
    rows = []
    for (shape, tokens, op, mode), vs in samples.items():
        wall = statistics.median(v[0] for v in vs)
        copy_s = statistics.median(v[1] for v in vs)
        nbytes, copies = vs[0][2], vs[0][3]
        rows.append({"shape": shape, "tokens": tokens, "new": a.new, "op": op, "mode": mode, "bytes": nbytes,
                     "copies": copies, "bytes_per_copy": nbytes / max(1, copies), "call_s": wall, "copy_s": copy_s,
                     "call_gb_s": nbytes / wall / 1e9, "copy_gb_s": nbytes / copy_s / 1e9,
                     "call_fraction_of_memcpy": nbytes / wall / bw, "copy_fraction_of_memcpy": nbytes / copy_s / bw})
    by = {(r["shape"], r["tokens"], r["op"], r["mode"]): r for r in rows}
    ratios = {f"{s} T={t} {op}": by[(s, t, op, "runs")]["call_s"] / by[(s, t, op, "stacked")]["call_s"]
              for (s, t, op, m) in by if m == "stacked" and (s, t, op, "runs") in by}
    region_ratios = {f"{s} T={t} {op}": by[(s, t, op, "stacked")]["call_s"] / by[(s, t, op, "region")]["call_s"]
                     for (s, t, op, m) in by if m == "region" and (s, t, op, "stacked") in by}
    full_ratios = {f"{s} T={t} {op}": by[(s, t, op, "full-trim")]["call_s"] / by[(s, t, op, "full")]["call_s"]
                   for (s, t, op, m) in by if m == "full" and (s, t, op, "full-trim") in by}
    memmove_ratios = {f"{s} T={t} {op}": by[(s, t, op, "address-memmove")]["call_s"] / by[(s, t, op, m)]["call_s"]
                      for (s, t, op, m) in by if m == "address" and (s, t, op, "address-memmove") in by}
    ssd, refs, depth_ratios, view_ratios = (
        ssd_rows(a.shapes, a.tokens, a.reps, a.ssd_dir, tuple(dict.fromkeys(a.ssd_depths)), a.ssd_views)
        if a.ssd_dir else ([], [], {}, {}))
    result = header(threads, None, benchmark="swap_tiers", reps=a.reps, new=a.new, ssd_rows=ssd, ssd_references=refs,
                    ssd_call_time_over_first_depth=depth_ratios, ssd_views_call_time_over_address=view_ratios,
                    memcpy_bytes_per_s=bw, memcpy_before_after=[bw0, bw1], rows=rows,
                    modes=list(modes), runs_over_stacked_call_time=ratios, stacked_over_region_call_time=region_ratios,
                    full_trim_over_full_call_time=full_ratios, memmove_over_one_call_call_time=memmove_ratios,
                    min_call_fraction={m: min(r["call_fraction_of_memcpy"] for r in rows if r["mode"] == m) for m in modes})
    emit(result, a.out, draw=draw if a.out and rows else None)
    return result


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    shapes = sorted({r["shape"] for r in rows}, key=list(SHAPES).index)
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        cases = sorted({(r["tokens"], r["op"]) for r in rows if r["shape"] == shape},
                       key=lambda c: (c[0], OPS.index(c[1])))
        modes = [m for m in ("runs", "stacked", "address-memmove", "address", "region", "full-trim", "full")
                 if m in result.get("modes", ("runs", "stacked"))]
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            vals = [next((r["call_fraction_of_memcpy"] for r in rows if r["shape"] == shape and r["mode"] == mode
                          and (r["tokens"], r["op"]) == c), 0.0) for c in cases]  # (full modes: no reuse ops)
            ax.bar([j + width * i for j in range(len(cases))], vals, width, label=mode)
        ax.axhline(0.5, color="k", lw=0.8, ls="--", label="issue 15's 50%")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"{op}\nT={t}" for t, op in cases], fontsize=6)
        ax.set_ylabel("host tier / memcpy (around the call)")
        ax.set_title(f"{shape}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
