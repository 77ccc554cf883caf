"""Where an offloaded fine-tuning step's SSD traffic and main-thread time go, per step: a meter that
`benchmarks.finetune_offload --traffic` installs in each worker process (the designs side by side, alternating).

SSD bytes are counted where the store hands a transfer to its swap space (`ExtentFile` / `FilePerKey` read and
write: the aligned bytes the aio engine moves), by direction and by the kind of tensor: `param` (the 16-bit
compute copy, which memascend keeps on the SSD and a ZeRO-Infinity design below DeepSpeed's max_in_cpu holds in
host memory), `master`, `exp_avg`, `exp_avg_sq`. Transfers before the first step (the initial write of the
weights) are counted apart (`before_steps`).

Main-thread seconds per step, each a call timed on the main thread only (the prefetcher's and the aio engine's
threads are not in them): `fetch_wait` (waiting for a unit's prefetched weights), `forward` (the units' forward,
the backward's recompute included; memascend's embedding reads the blocks its tokens hit inside it), `backward`
(autograd's backward through the layers), `head` (the head's forward and backward; memascend's reads its (V, C)
matrix in blocks inside it), and parts of the optimizer update (the
trainer's `optimizer_seconds` is the whole): `update_read_wait` (waiting for master and moments), `update_write_wait`
(waiting for a piece's writes to free its set), `adamw`, `copy_and_submit` (the fresh 16-bit copy and queueing
the writes), `blockwise_grad` (memascend's head and embedding gradients, made a block of rows at a time in their
group's update; the rival makes its head's in `head`). A call inside another timed one counts in the outer one
only (the head's own autograd backward is the head's), so the parts are disjoint.

CPU seconds per step by thread (`cpu`, from one step's start to the next's, so none for the last step):
`main`, `aio` (the aio engine's threads, which run every SSD transfer's syscall) and `other` (the rest of the
process: the prefetcher's thread, torch's). On a machine others load, a second's CPU in the process's other
threads is a second the main thread may wait for a core. Beside them the main thread's context switches
(`main_voluntary_switches`: it blocked, on I/O, a lock or the GIL; `main_involuntary_switches`: it was
preempted).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

KINDS = ("param", "master", "exp_avg", "exp_avg_sq")
PARTS = ("fetch_wait", "forward", "backward", "head", "update_read_wait", "update_write_wait", "adamw",
         "copy_and_submit", "blockwise_grad")


class TrafficMeter:
    """Counts a run's SSD bytes and times its main-thread parts, per step (`install` before the run, `result`
    after; `uninstall` puts the wrapped functions back)."""

    def __init__(self) -> None:
        self.step = -1  # before the first step: the initial write of the weights
        self.bytes: dict[int, dict[str, dict[str, int]]] = defaultdict(
            lambda: {"read": dict.fromkeys(KINDS, 0), "write": dict.fromkeys(KINDS, 0)})
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PARTS, 0.0))
        self._undo: list[tuple[object, str, object]] = []
        self._inside = False  # the main thread is in a timed call
        self.cpu: dict[int, dict[str, float]] = {}
        # process, main, aio threads' CPU; the main thread's context switches
        self._cpu_at: tuple[float, float, dict[int, float], tuple[int, int]] | None = None

    def install(self) -> None:
        from memfit.memory import aio
        import torch

        from memfit.train.finetune import gradients, optim, prefetch, store, store_update, units

        for space in (aio.ExtentFile, aio.FilePerKey):
            for direction in ("read", "write"):
                self._patch(space, direction, self._counted(direction, aio._span))
        self._patch(store.GroupStore, "zero_grad", self._steps)
        for owner, name, part in ((prefetch.Prefetcher, "next", "fetch_wait"), (units.UnitRunner, "forward", "forward"),
                                  (torch.autograd, "backward", "backward"), (units.UnitRunner, "head_step", "head"),
                                  (store_update, "wait", "update_read_wait"), (store, "wait", "update_write_wait"),
                                  (optim.AdamW, "update", "adamw"),
                                  (store.GroupStore, "_submit_write_piece", "copy_and_submit"),
                                  (gradients.PieceGrad, "fill", "blockwise_grad")):
            self._patch(owner, name, self._timed(part))

    def uninstall(self) -> None:
        while self._undo:
            owner, name, real = self._undo.pop()
            setattr(owner, name, real)

    def result(self) -> dict:
        """Per step (from 0): SSD bytes {read, write} x kind, and main-thread seconds per part; and the bytes
        moved before the first step."""
        steps = sorted(s for s in set(self.bytes) | set(self.seconds) if s >= 0)
        return {"before_steps": self.bytes[-1], "ssd_bytes": [self.bytes[s] for s in steps],
                "cpu": [{k: round(v, 4) for k, v in self.cpu.get(s, {}).items()} for s in steps],
                "seconds": [{k: round(v, 4) for k, v in self.seconds[s].items()} for s in steps]}

    def _patch(self, owner: object, name: str, wrap: Callable) -> None:
        real = getattr(owner, name)
        self._undo.append((owner, name, real))
        setattr(owner, name, wrap(real))

    def _counted(self, direction: str, span: Callable) -> Callable:
        def wrap(real):
            def f(space, key, buf, nbytes=None, offset=0):
                kind = key.rsplit(".", 1)[-1]
                self.bytes[self.step][direction][kind] += span(space.lengths[key], nbytes, offset, 0)[0]
                return real(space, key, buf, nbytes, offset)
            return f
        return wrap

    def _cpu_mark(self) -> None:
        """A step begins: close the last step's CPU account (if one ran) and open this one's."""
        now = time.process_time(), time.thread_time(), {
            t.ident: time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threading.enumerate()
            if t.name.startswith("memfit-aio") and t.ident is not None}, _switches()
        if self._cpu_at is not None and self.step >= 0:
            (p0, m0, a0, s0), (p1, m1, a1, s1) = self._cpu_at, now
            aio = sum(v - a0.get(ident, 0.0) for ident, v in a1.items())
            self.cpu[self.step] = {"main": m1 - m0, "aio": aio, "other": (p1 - p0) - (m1 - m0) - aio,
                                   "main_voluntary_switches": s1[0] - s0[0],
                                   "main_involuntary_switches": s1[1] - s0[1]}
        self._cpu_at = now

    def _steps(self, real):
        def f(*a, **k):
            self._cpu_mark()
            self.step += 1
            return real(*a, **k)
        return f

    def _timed(self, part: str) -> Callable:
        def wrap(real):
            def f(*a, **k):
                if self.step < 0 or self._inside or threading.current_thread() is not threading.main_thread():
                    return real(*a, **k)
                self._inside, t0 = True, time.perf_counter()
                try:
                    return real(*a, **k)
                finally:
                    self._inside = False
                    self.seconds[self.step][part] += time.perf_counter() - t0
            return f
        return wrap


def _switches() -> tuple[int, int]:
    """The calling thread's (voluntary, involuntary) context switches so far (Linux; zeros elsewhere)."""
    try:
        with open("/proc/thread-self/status") as f:
            fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
    except OSError:
        return 0, 0
    return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])
