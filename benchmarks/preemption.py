"""Preemption under changing priorities: recompute against swapping the KV, per block or in whole runs, sync or async.

Workload (seeded): `--requests` requests with Poisson arrivals at `--rate` per second; prompt lengths log-normal
(median `--prompt-median`, sigma 0.6, clipped to 16..`--prompt-max`), output lengths uniform in 16..`--output-max`;
priorities 0..3, and at every engine step each unfinished request changes to a random priority with probability
`--change` (FastSwitch's "priority change frequency"; a Markov pattern). The engine runs `--scheduling-policy
priority` (preemptive) under a KV budget of `--kv-seqs` full-length sequences, so preemption is frequent.

Variants, on the virtual cache unless named paged-, each in a fresh process (its own peak RSS), differing in one
mechanism:
- recompute: preempted KV is freed and recomputed;
- swap-block: swapped to the host tier in copies of 16 tokens per (layer, K|V) segment, synchronously (vLLM's
  per-block swap, in the same cache);
- swap-run: each segment's whole run in one copy, synchronously (FastSwitch's large chunks);
- swap-run-async: the same, swap-outs and swap-ins on 2 threads overlapped with the model step;
- swap-run-reuse: swap-run with cross-turn reuse (kv/swap.py): host copies are kept after a swap-in, a later
  swap-out moves only new tokens, and a finished turn's KV evicted under pressure waits on the host for the
  conversation's next turn (the other variants free it: the next turn prefills its whole history);
- swap-run-reuse-merge2: swap-run-reuse merging a copy's host chunks once 2 are held, as before the CPU's
  stacked copies waited for 8 (kv/swap.py MERGE_AT_STACKED; not in the default set);
- swap-run-reuse-views: swap-run-reuse copying a stacked swap-out through a view and a torch copy, as before its
  rows were copied by address (kv/swap.py BY_ADDRESS_MAX; not in the default set);
- swap-run-reuse-async: swap-run-reuse with the copies on 2 threads (FastSwitch's three mechanisms together);
- swap-run-reuse-async-memmove: the same as before a stacked chunk's rows went by address in one C call
  (kernels/copy_rows.py): a `ctypes.memmove` a row on the engine thread, and on the pool a view and a torch copy
  (not in the default set);
- swap-run-reuse-ssd: swap-run-reuse-async with a host tier of only `--ssd-host-seqs` full-length sequences
  above an SSD tier (a preallocated file under `--ssd-dir`, O_DIRECT where the file system takes it);
- swap-run-reuse-ssd-prewrite: the same with the SSD tier's file written with zeros before the run
  (`swap_ssd_prewrite`), so no swap is a first write into an unwritten extent (not in the default set).
- swap-run-reuse-ssd-unbatched: the same with one SSD I/O per chunk (`SSDTier.batch = False`), as before a
  sequence's chunks demoted together were written in one pass and read back in one (not in the default set).
- swap-run-reuse-ssd-pyloop: the same with the SSD tier's fallback path, zlib's CRC-32 and the O_DIRECT loop in
  Python (what a CPU without the C I/O kernels gets; before they were built apart from the AVX-512 kernels, every
  AVX2-only CPU did; not in the default set).
- swap-run-reuse-ssd-depth1: the same with the C loop at depth 1, one whole-stage I/O at a time with its copies
  and checksums between them, as before the stage's pieces overlapped them; -depth2: in halves, one copied while
  the other's I/O runs (the default cuts it in quarters, three in flight; kernels/staged_io.py; neither in the
  default set).
- swap-run-reuse-ssd-views: the same with the SSD tier given its KV runs as a torch view each, as before they
  were named by address (`SSDTier.by_address`, kv/swap_layout.py `addresses`; not in the default set).
- paged-swap-block: the paged cache (vLLM's block pool and free-block stack), swapped one copy per block per
  (layer, K|V) pool, synchronously: vLLM's own per-block swap;
- paged-swap-group: the same with block groups (`kv_block_groups`, memory/blocks.py): blocks come from a buddy
  allocator of contiguous groups and a swap copies each contiguous run of a sequence's blocks once.
The swap variants without "reuse" run with `swap_reuse=False`. The paged variants are compared with each other
(`speedup_over_swap_block` takes paged-swap-block as their baseline).

`--workload multiturn` replays conversations instead (benchmarks/multiturn.py: MT-Bench two-turn questions and
ShareGPT-like 3-8-turn conversations, each turn resending the history with the conversation's session id); the
KV budget is then `--kv-seqs` sequences of `--history-max` tokens, and TTFT is per turn. Its default variants are
all of the above.

Reported per variant: TTFT P50/P95/P99/P99.9, TBT P99.9, throughput (generated tokens / makespan), preemptions
by mode, swap copies and bytes per tier, each tier's swap throughput as a fraction of its bandwidth measured here
(host: a 64 MiB memcpy; also `fraction_of_cold_copy`: against contiguous copies of each swap's own size
with cold caches, benchmarks/copy_reference.py, what a copy of that size can reach after a model step; SSD:
O_DIRECT writes and reads of 4 MiB, under `--ssd-dir`; also against 1 MiB I/Os, the largest the tier issues: its
staging buffer, and 256 KiB ones four in flight, as its C loop issues them; each measured before the runs and after,
the median of the two, `ssd_bandwidth.before_after` keeping both), the SSD tier's bytes per op (a call) and per I/O, the share of its time in the
system calls and waiting for a CPU, and the same I/Os replayed alone against the same reference
(benchmarks/ssd_trace.py), peak RSS;
each the median of `--reps` interleaved repetitions (the raw runs are kept under "runs").

    OMP_NUM_THREADS=1 python -m benchmarks.preemption --out benchmarks/results/preemption.json
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import statistics
import time
from pathlib import Path

VARIANTS = {  # name -> engine options (the swap granularity is set on the swap space: block_tokens)
    "recompute": dict(preemption_mode="recompute"),
    "swap-block": dict(preemption_mode="swap", swap_threads=0, block_tokens=16, swap_reuse=False),
    "swap-run": dict(preemption_mode="swap", swap_threads=0, swap_reuse=False),
    "swap-run-async": dict(preemption_mode="swap", swap_threads=2, swap_reuse=False),
    "swap-run-reuse": dict(preemption_mode="swap", swap_threads=0, swap_reuse=True),
    "swap-run-reuse-async": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True),
    # as before MERGE_AT_STACKED (kv/swap.py): a copy's host chunks merged once 2 are held, on the CPU too
    "swap-run-reuse-merge2": dict(preemption_mode="swap", swap_threads=0, swap_reuse=True, merge_at=2),
    # as before a stacked swap-out copied its rows by address (kv/swap.py BY_ADDRESS_MAX): a view and a torch copy
    "swap-run-reuse-views": dict(preemption_mode="swap", swap_threads=0, swap_reuse=True, by_address=False),
    # as before a stacked chunk's rows went in one C call (kernels/copy_rows.py): a memmove a row, synchronous swaps
    # only (the pool's kept the view and torch's copy)
    "swap-run-reuse-async-memmove": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, one_call=False),
    # as before the host tier's region (memory/host_region.py): a fresh torch buffer for every chunk swapped out
    "swap-run-reuse-noregion": dict(preemption_mode="swap", swap_threads=0, swap_reuse=True, region=False),
    # as before the scheduler's ski-rental rule: a swapped turn waits for room for its whole history, however long
    "swap-run-reuse-async-wait": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, wait_always=True),
    "swap-run-reuse-ssd": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True),
    "swap-run-reuse-ssd-prewrite": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True,
                                        swap_ssd_prewrite=True),
    "swap-run-reuse-ssd-unbatched": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True,
                                         ssd_batch=False),
    "swap-run-reuse-ssd-pyloop": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True,
                                      ssd_pyloop=True),
    "swap-run-reuse-ssd-depth1": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True,
                                      ssd_depth=1),
    "swap-run-reuse-ssd-depth2": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True,
                                      ssd_depth=2),
    "swap-run-reuse-ssd-views": dict(preemption_mode="swap", swap_threads=2, swap_reuse=True, ssd=True,
                                     ssd_by_address=False),
    "paged-swap-block": dict(kv_cache="paged", preemption_mode="swap", swap_threads=0, swap_reuse=False),
    "paged-swap-group": dict(kv_cache="paged", kv_block_groups=True, preemption_mode="swap", swap_threads=0,
                             swap_reuse=False),
}
DEFAULT_VARIANTS = {"single": "recompute,swap-block,swap-run,swap-run-async",
                    "multiturn": "recompute,swap-block,swap-run,swap-run-async,swap-run-reuse,swap-run-reuse-async,"
                                 "swap-run-reuse-ssd"}


def workload(a: argparse.Namespace) -> list[dict]:
    rng = random.Random(a.seed)
    t, out = 0.0, []
    for i in range(a.requests):
        t += rng.expovariate(a.rate)
        plen = int(min(a.prompt_max, max(16, rng.lognormvariate(0, 0.6) * a.prompt_median)))
        out.append({"arrival": t, "prompt_len": plen, "max_tokens": rng.randint(16, a.output_max),
                    "priority": rng.randrange(4)})
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def memcpy_bandwidth(nbytes: int = 64 << 20, reps: int = 5) -> float:
    """Host copy bandwidth (bytes/s, best of `reps`): the ceiling a host-tier swap can reach here."""
    import torch

    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def ssd_reference(directory: str) -> dict:
    """The SSD tier's references: `ssd_bandwidth` at 4 MiB I/Os one at a time; at the tier's largest I/O, its 1 MiB
    staging buffer (memory/extent_store.py: STAGE), `at_stage`; and as the C loop moves it by default, quarters of
    it four in flight (kernels/staged_io.py), `in_flight`."""
    from memfit.memory.extent_store import STAGE

    return {**ssd_bandwidth(directory), "at_stage": {"piece_bytes": STAGE, **ssd_bandwidth(directory, piece=STAGE)},
            "in_flight": {"piece_bytes": STAGE // 4, "depth": 4,
                          **ssd_bandwidth(directory, piece=STAGE // 4, depth=4)}}


def _median_reference(refs: list[dict]) -> dict:
    """`ssd_reference`s merged: each rate the median of its measures, the rest as the first has it."""
    out: dict = {}
    for k, v in refs[0].items():
        if isinstance(v, dict):
            out[k] = _median_reference([r[k] for r in refs])
        elif isinstance(v, float):
            out[k] = statistics.median(r[k] for r in refs)
        else:
            out[k] = v
    return out


def ssd_bandwidth(directory: str, nbytes: int = 64 << 20, piece: int = 4 << 20, reps: int = 3,
                  depth: int = 1) -> dict:
    """O_DIRECT write and read bandwidth (bytes/s, best of `reps`) of a file under `directory`, in `piece`-sized
    aligned I/Os, `depth` of them in flight (threads: os.pwritev/preadv let the GIL go): the ceiling an SSD-tier
    swap can reach there. Buffered I/O (noted) where O_DIRECT is refused. Also the CRC-32 rate (zlib), which every
    SSD-tier write and read pays on top."""
    import mmap
    import os
    import tempfile
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    bufs = [mmap.mmap(-1, piece) for _ in range(depth)]  # page-aligned
    for buf in bufs:
        buf.write(os.urandom(piece))
    fd_, path = tempfile.mkstemp(dir=directory, prefix="memfit-ssd-bw-")
    os.close(fd_)
    try:
        try:
            fd, direct = os.open(path, os.O_RDWR | os.O_DIRECT), True
        except OSError:
            fd, direct = os.open(path, os.O_RDWR), False
        os.posix_fallocate(fd, 0, nbytes)
        best = {"write": float("inf"), "read": float("inf")}
        offs = range(0, nbytes, piece)
        pool = ThreadPoolExecutor(depth) if depth > 1 else None
        for _ in range(reps):
            for kind in ("write", "read"):
                io = os.pwritev if kind == "write" else os.preadv

                def lane(i: int) -> None:  # every depth-th piece, through buffer i
                    for off in offs[i::depth]:
                        io(fd, [bufs[i]], off)
                t0 = time.perf_counter()
                if pool is None:
                    lane(0)
                else:
                    list(pool.map(lane, range(depth)))
                if kind == "write":
                    os.fsync(fd)
                best[kind] = min(best[kind], time.perf_counter() - t0)
        os.close(fd)
        if pool is not None:
            pool.shutdown()
    finally:
        os.unlink(path)
    crc, data = float("inf"), os.urandom(nbytes)  # nbytes apart: not all in the CPU's caches, as swapped KV is not
    for _ in range(reps):
        t0 = time.perf_counter()
        zlib.crc32(data)
        crc = min(crc, time.perf_counter() - t0)
    return {"write_bytes_per_s": nbytes / best["write"], "read_bytes_per_s": nbytes / best["read"], "direct": direct,
            "crc32_bytes_per_s": nbytes / crc}


def run_variant(a: argparse.Namespace, name: str) -> dict:
    """One variant in this process: replay the workload against the engine in wall-clock time."""
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    if a.model in ("0.1b", "0.5b"):  # a random-initialised Llama shape (benchmarks/decode_setup.py), built once
        from benchmarks.decode_setup import make_model_dir

        root = Path("/tmp/memfit-bench-models")
        path = root / f"llama-{a.model}-{a.dtype or 'float32'}"
        a.model = str(path if (path / "model.safetensors").exists() else make_model_dir(a.model, a.dtype or "float32", root))
    opts = dict(VARIANTS[name])
    block_tokens = opts.pop("block_tokens", None)
    wait_always = opts.pop("wait_always", False)
    ssd = opts.pop("ssd", False)
    ssd_batch = opts.pop("ssd_batch", True)
    ssd_pyloop = opts.pop("ssd_pyloop", False)
    ssd_depth = opts.pop("ssd_depth", None)  # None: the C loop's default
    ssd_by_address = opts.pop("ssd_by_address", True)
    region = opts.pop("region", True)
    merge_at = opts.pop("merge_at", None)
    by_address = opts.pop("by_address", True)
    if not opts.pop("one_call", True):  # process-wide; a fresh process each run
        from memfit.llm.kernels.copy_rows import set_one_call

        set_one_call(False)
    longest = a.history_max if a.workload == "multiturn" else a.prompt_max + a.output_max
    cfg = EngineConfig(model=a.model, dtype=a.dtype, threads=a.threads, scheduling_policy="priority",
                       max_num_seqs=a.max_num_seqs, max_model_len=longest + 1,
                       kv_eager_pages=0, kv_prefault=False, enable_prefix_caching=False)
    probe = LLMEngine(cfg.with_overrides(kv_budget="1GiB"))
    kv_budget = int(a.kv_seqs * probe.kv.bytes_needed(longest))
    if ssd:  # a small host tier, so swapped KV goes on down to the SSD tier
        import atexit
        import shutil
        import tempfile

        host = int(a.ssd_host_seqs * probe.layout.bytes_per_token * longest)
        tmp = tempfile.mkdtemp(dir=a.ssd_dir, prefix="memfit-bench-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        opts.update(swap_space=f"{host}B", swap_ssd_path=tmp, swap_ssd_space="256MiB")
        from benchmarks.ssd_trace import SSDTrace

        a.ssd_trace = SSDTrace.install()  # where the tier's time goes (benchmarks/ssd_trace.py)
    vocab = probe.model_config.vocab_size
    probe.close()
    del probe
    if opts.get("preemption_mode", "recompute") != "recompute":  # the tiers exist for swap preemption only
        opts.setdefault("swap_space", "1GiB")
    engine = LLMEngine(cfg.with_overrides(kv_budget=kv_budget, **opts))
    engine.scheduler.recompute_after_wait = not wait_always
    if engine.swap is not None:
        engine.swap.block_tokens = block_tokens
        engine.swap.merge_at = merge_at
        engine.swap.by_address = by_address
        a.host_ops = record_host_ops(engine.swap)
        if not region and engine.swap.region is not None:  # before any swap: every chunk gets a buffer of its own
            engine.swap.region.close()
            engine.swap.region = engine.swap.book.region = None
        if engine.swap.ssd is not None:
            engine.swap.ssd.batch = ssd_batch
            engine.swap.ssd.by_address = ssd_by_address
            if ssd_pyloop:  # the fallback: zlib's CRC-32, the store's Python loop (kv/swap_ssd.py, _staged -> None)
                from memfit.llm.kernels.crc32c import checksum

                engine.swap.ssd.checksum, engine.swap.ssd._update = checksum("crc32")
                engine.swap.ssd._io = None
            elif engine.swap.ssd._io is not None and ssd_depth is not None:  # process-wide; a fresh process each
                engine.swap.ssd._io.set_depth(ssd_depth)
    if a.workload == "multiturn":
        from benchmarks.multiturn import replay

        run = replay(a, engine)
        return summarise(a, name, engine, run["times"], run["sent"], run["makespan"], kv_budget,
                         turns=run["turns"], conversations=run["conversations"])
    reqs = workload(a)
    rng = random.Random(a.seed + 1)
    prompts = [[rng.randrange(3, vocab) for _ in range(r["prompt_len"])] for r in reqs]
    change = random.Random(a.seed + 2)
    times: dict[str, list[float]] = {}
    arrival: dict[str, float] = {}
    pending = list(range(len(reqs)))
    t0 = time.perf_counter()
    live: set[str] = set()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and reqs[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            r = reqs[i]
            rid = f"r{i}"
            engine.add_request(prompt_token_ids=prompts[i], request_id=rid, priority=r["priority"],
                               params=SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True))
            arrival[rid], times[rid] = t0 + r["arrival"], []
            live.add(rid)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, reqs[pending[0]]["arrival"] - (time.perf_counter() - t0)))
            continue
        for rid in sorted(live):  # priority changes: a Markov pattern, seeded
            if change.random() < a.change:
                engine.set_priority(rid, change.randrange(4))
        outs = engine.step()
        stamp = time.perf_counter()
        for out in outs:
            got = len(out.outputs[0].token_ids)
            times[out.request_id] += [stamp] * (got - len(times[out.request_id]))
            if out.finished:
                live.discard(out.request_id)
    makespan = time.perf_counter() - t0
    return summarise(a, name, engine, times, arrival, makespan, kv_budget)


def record_host_ops(swap) -> list[tuple[int, float]]:
    """(bytes, seconds) of every host-tier swap-out and swap-in `swap` accounts from now on, in order: the sizes
    the cold-copy reference is taken at (benchmarks/copy_reference.py)."""
    ops: list[tuple[int, float]] = []
    account = swap._account

    def recorded(st, nbytes: int, n: int, seconds: float, out: bool) -> None:
        if st is swap.stats:
            ops.append((nbytes, seconds))
        account(st, nbytes, n, seconds, out)

    swap._account = recorded
    return ops


def summarise(a: argparse.Namespace, name: str, engine, times: dict, arrival: dict, makespan: float,
              kv_budget: int, **extra) -> dict:
    """One run's figures from each request's token stamps and arrival time."""
    ttft = [times[r][0] - arrival[r] for r in times]
    tbt = [b - a_ for ts in times.values() for a_, b in zip(ts, ts[1:])]
    st = engine.stats()
    swap = st["swap"]
    result = {
        "variant": name,
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 95, 99, 99.9)},
        "tbt_p99_9_s": percentile(tbt, 99.9),
        "throughput_tok_s": sum(len(ts) for ts in times.values()) / makespan,
        "makespan_s": makespan,
        "preemptions": st["preemptions_by_mode"],
        "admission_waits": st["admission_waits"],  # times the next waiting sequence was refused memory, give-ups
        "kv_budget_bytes": kv_budget,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **extra,
    }
    if swap:
        seconds = swap["seconds_sum"]
        result["swap"] = {"tier": "host", "out_ops": swap["out_ops"], "in_ops": swap["in_ops"],
                          "out_bytes": swap["out_bytes"], "in_bytes": swap["in_bytes"],
                          "async_swap_ins": swap["async_swap_ins"], "async_swap_outs": swap["async_swap_outs"],
                          "seconds": seconds,
                          "moved_bytes": swap["out_bytes"] + swap["in_bytes"],
                          "bytes_per_copy": ((swap["out_bytes"] + swap["in_bytes"]) / (swap["out_ops"] + swap["in_ops"])
                                             if swap["out_ops"] + swap["in_ops"] else None),
                          "reused_tokens": swap.get("reused_tokens", 0),
                          # host copies per swap-in: in_ops / swap_ins (merges bound it: kv/swap_pairs.py)
                          "swap_ins": swap.get("swap_ins", 0), "merges": swap.get("merges", 0),
                          "bytes_per_s": (swap["out_bytes"] + swap["in_bytes"]) / seconds if seconds else None,
                          "tiers": {t["tier"]: {k: t[k] for k in ("out_ops", "in_ops", "out_bytes", "in_bytes",
                                                                  "seconds_sum", "io_errors")}
                                    | ({k: t[k] for k in ("direct_io", "checksum", "syscall_seconds") if k in t})
                                    for t in swap["tiers"]}}
        if getattr(a, "host_ops", None) and "host" in result["swap"]["tiers"]:
            result["swap"]["tiers"]["host"]["op_bytes"] = [n for n, _ in a.host_ops]
        if getattr(a, "ssd_trace", None) is not None and "ssd" in result["swap"]["tiers"]:
            result["swap"]["tiers"]["ssd"]["trace"] = a.ssd_trace.summary(a.ssd_dir, engine.swap.ssd.store.capacity)
        if "ssd" in result["swap"]["tiers"]:  # the C loop's pieces in flight (kernels/staged_io.py), 0: Python loop
            io = engine.swap.ssd._io
            result["swap"]["tiers"]["ssd"]["io_depth"] = io.depth if io is not None else 0
    engine.close()
    return result


def median_row(reps: list[dict]) -> dict:
    """The median over repetitions of every number in a variant's result, each over the reps that have it (a rep
    with no host swap has no cold-copy figures): so figures of one row may come from different reps, and a ratio
    of two medians is not the median ratio (`fraction_of_cold_copy` is taken per run, then its median)."""
    import statistics

    def med(values: list):
        if isinstance(values[0], dict):
            keys = dict.fromkeys(k for v in values for k in v)
            return {k: med([v[k] for v in values if k in v]) for k in keys}
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers:
            return statistics.median(numbers)
        return values[0]  # strings, or None in every rep (no swap happened)

    return med(reps)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "p99", "TTFT P99 (s)"), (axes[1], None, "TBT P99.9 (s)"),
                           (axes[2], "ops", "swap copies (out + in)")):
        if key == "p99":
            vals = [r["ttft_s"]["p99"] for r in rows]
        elif key is None:
            vals = [r["tbt_p99_9_s"] for r in rows]
        elif result.get("workload") == "multiturn":  # every tier's bytes (the SSD variant moves most below the host)
            vals = [sum(t["out_bytes"] + t["in_bytes"] for t in r.get("swap", {}).get("tiers", {}).values()) / 2**20
                    if "tiers" in r.get("swap", {}) else r.get("swap", {}).get("moved_bytes", 0) / 2**20 for r in rows]
            label = "swap MiB moved (out + in, all tiers)"
        else:
            vals = [r.get("swap", {}).get("out_ops", 0) + r.get("swap", {}).get("in_ops", 0) for r in rows]
        ax.bar(names, vals, color=(["#888", "#c44", "#48c", "#4a4", "#a6c", "#e90", "#2aa", "#c8a", "#6a2"] * 2)[: len(names)])
        ax.set_title(label)
        if key != "ops":
            ax.set_yscale("log")  # recompute's tail is 10x the others
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"preemption under priority changes ({result['model']}, change {result['change']}/step)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="memfit-tiny", help="a model name or directory, or 0.1b / 0.5b (random Llama shapes)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    ap.add_argument("--change", type=float, default=0.02, help="per request per step: chance of a priority change")
    ap.add_argument("--prompt-median", type=int, default=160)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--output-max", type=int, default=96)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--kv-seqs", type=float, default=3.0, help="KV budget, in full-length sequences")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every variant, interleaved; medians reported")
    ap.add_argument("--variants", default=None, help="comma-separated (default: per workload, see above)")
    ap.add_argument("--workload", default="single", choices=["single", "multiturn"])
    ap.add_argument("--think", type=float, default=0.5, help="multiturn: mean seconds between a turn and the next")
    ap.add_argument("--history-max", type=int, default=1024, help="multiturn: longest conversation, in tokens")
    ap.add_argument("--ssd-dir", default="/tmp", help="swap-run-reuse-ssd: where the SSD tier's file goes")
    ap.add_argument("--ssd-host-seqs", type=float, default=0.5,
                    help="swap-run-reuse-ssd: the host tier's size, in full-length sequences")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--runs-from", default=None, help="summarise the runs logged (stderr) by an earlier invocation")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from benchmarks.common import emit, header, pin_threads

    pin_threads(a.threads)
    if a.worker:
        print(json.dumps(run_variant(a, a.worker)))
        return 0
    argv = [x for x in sys.argv[1:]]
    if "--out" in argv:
        i = argv.index("--out")
        del argv[i : i + 2]
    names = (a.variants or DEFAULT_VARIANTS[a.workload]).split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    if a.runs_from:  # the per-run JSON lines a previous invocation logged on stderr (one per variant and rep)
        for line in Path(a.runs_from).read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                runs[row["variant"]].append(row)
    uses_ssd = any(VARIANTS[n].get("ssd") for n in names)
    # the disk's reference before the runs and after (it moves by a quarter between probes here): the median of both
    disks = [ssd_reference(a.ssd_dir)] if uses_ssd and not a.runs_from else []
    for rep in range(0 if a.runs_from else a.reps):  # interleaved (ABCD ABCD ...): a busy spell of the shared machine hits every variant
        for name in names:
            print(f"[preemption] rep {rep + 1}/{a.reps}: {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.preemption", *argv, "--worker", name],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                proc.check_returncode()
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[name][-1]), file=sys.stderr, flush=True)
    cold = None
    if any(r.get("swap", {}).get("tiers", {}).get("host", {}).get("op_bytes") for rs in runs.values() for r in rs):
        from benchmarks.copy_reference import cold_copy_rates, cold_copy_seconds

        cold = cold_copy_rates()
        for rs in runs.values():  # per run: the seconds its host swaps would take as cold copies of their sizes
            for r in rs:
                t = r.get("swap", {}).get("tiers", {}).get("host")
                if t and t.get("op_bytes") and t["seconds_sum"]:
                    t["cold_copy_seconds"] = sum(cold_copy_seconds(n, cold) for n in t["op_bytes"])
                    t["fraction_of_cold_copy"] = t["cold_copy_seconds"] / t["seconds_sum"]
                    t["largest_op_bytes"] = max(t["op_bytes"])
    rows = [median_row(runs[n]) for n in names]
    for r in rows:  # (a list per run: medians of it mean nothing)
        r.get("swap", {}).get("tiers", {}).get("host", {}).pop("op_bytes", None)
    bw = memcpy_bandwidth()
    disk = None
    if uses_ssd:
        disks.append(ssd_reference(a.ssd_dir))
        disk = {**_median_reference(disks), "before_after": disks}
    for r in rows:
        if r.get("swap", {}).get("bytes_per_s"):
            r["swap"]["fraction_of_memcpy"] = r["swap"]["bytes_per_s"] / bw
        for tier, t in r.get("swap", {}).get("tiers", {}).items():
            if not t["seconds_sum"] or (tier == "ssd" and disk is None):
                continue  # the tier's fraction: the seconds its bytes take at the measured bandwidth, over its own
            ideal = ((t["out_bytes"] + t["in_bytes"]) / bw if tier == "host" else
                     t["out_bytes"] / disk["write_bytes_per_s"] + t["in_bytes"] / disk["read_bytes_per_s"])
            t["fraction_of_bandwidth"] = ideal / t["seconds_sum"]
            if tier == "ssd":  # where its time goes: I/O size, system calls against copies and checksums
                st = disk["at_stage"]
                t["fraction_of_bandwidth_at_stage"] = (t["out_bytes"] / st["write_bytes_per_s"] +
                                                       t["in_bytes"] / st["read_bytes_per_s"]) / t["seconds_sum"]
                fl = disk["in_flight"]
                t["fraction_of_bandwidth_in_flight"] = (t["out_bytes"] / fl["write_bytes_per_s"] +
                                                        t["in_bytes"] / fl["read_bytes_per_s"]) / t["seconds_sum"]
                t["bytes_per_op"] = (t["out_bytes"] + t["in_bytes"]) / max(1, t["out_ops"] + t["in_ops"])
                if t.get("syscall_seconds"):
                    t["syscall_share"] = t["syscall_seconds"] / t["seconds_sum"]
                tr = t.get("trace")
                if tr and tr["write"]["replay_seconds"] + tr["read"]["replay_seconds"]:  # the same I/Os, alone
                    t["replay_fraction_of_bandwidth"] = (tr["write"]["bytes"] / disk["write_bytes_per_s"] +
                                                         tr["read"]["bytes"] / disk["read_bytes_per_s"]) / \
                        (tr["write"]["replay_seconds"] + tr["read"]["replay_seconds"])
                    t["runqueue_wait_share"] = ((tr["write"]["runqueue_wait_seconds"] +
                                                 tr["read"]["runqueue_wait_seconds"]) / t["seconds_sum"])
                    t["bytes_per_io"] = (tr["write"]["bytes"] + tr["read"]["bytes"]) / \
                        max(1, tr["write"]["ios"] + tr["read"]["ios"])  # an op (a call) may hold several
    bases = {r["variant"]: r for r in rows if r["variant"] in ("swap-block", "paged-swap-block")}
    ratios = {}
    for r in rows:  # against the per-block swap of the same cache
        base = bases.get("paged-swap-block" if r["variant"].startswith("paged-") else "swap-block")
        if base is not None:
            ratios[r["variant"]] = {
                "ttft_p99_vs_swap_block": base["ttft_s"]["p99"] / r["ttft_s"]["p99"],
                "tbt_p99_9_vs_swap_block": base["tbt_p99_9_s"] / r["tbt_p99_9_s"],
            }
    result = {**header(a.threads, a.seed), "benchmark": "preemption", "workload": a.workload, "model": a.model, "rate": a.rate,
              "change": a.change, "requests": a.requests, "reps": a.reps, "memcpy_bytes_per_s": bw,
              "cold_copy_bytes_per_s": {str(k): v for k, v in cold.items()} if cold else None, "ssd_bandwidth": disk,
              "rows": rows, "speedup_over_swap_block": ratios, "runs": runs}
    emit(result, a.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
