"""The pipelined optimizer update on the SSD tier (design.update_depth > 1, store_update.py): the next piece read and
the last ones written while AdamW runs, a group's first piece read during its backward (prepare_update), its last
writes finishing during the next units' backward. Checked against the sequential update (depth 1) with an aio
engine that does each transfer only when it is waited for: the latest a real engine could finish it. A slot or
a source buffer reused before its write is waited for then holds other bytes when the write runs, and a write
never waited for never reaches the file, so either shows in the losses or the saved state.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from memfit.memory.aio import AioEngine
from memfit.memory.hostpool import SlotPool
from memfit.train.finetune import store as store_mod
from memfit.train.finetune.design_base import HostMemoryDesign
from memfit.train.finetune.designs import MemAscend
from memfit.train.finetune.executor import StepExecutor
from memfit.train.finetune.units import UnitRunner
from tests.train.test_finetune import cfg, make_tiny, run
from tests.train.test_finetune_blockwise import _tensors


class LazyFuture:
    """Runs its transfer when first waited for (from whichever thread waits)."""

    def __init__(self, fn) -> None:
        self._fn, self._done, self._lock = fn, False, threading.Lock()

    def result(self, timeout: float | None = None) -> None:
        with self._lock:
            if not self._done:
                self._fn()
                self._done = True


class LazyEngine(AioEngine):
    def submit(self, write, fd, buf, nbytes, offset):
        return [LazyFuture(lambda s=s, n=min(self.block_size, nbytes - s): self._one(write, fd, buf, s, n, offset + s))
                for s in range(0, nbytes, self.block_size)]


def _fail_on_slot_wait(monkeypatch) -> None:
    """Make a store's optimizer pool fail where the update would wait for a slot: only the main thread takes and
    gives back optimizer slots, so such a wait would never end (a set taken beyond the pool)."""
    real_init = store_mod.GroupStore.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        pool = self.opt_pool

        def acquire(nbytes: int, _real=SlotPool.acquire.__get__(pool)):
            assert any(s >= nbytes and free for s, free in pool._free.items()), "update waited for a slot"
            return _real(nbytes)
        pool.acquire = acquire

    monkeypatch.setattr(store_mod.GroupStore, "__init__", init)


def _train(tmp_path, monkeypatch, name: str, depth: int, lazy: bool, tied: bool) -> tuple[list[float], dict, int]:
    """3 steps of memascend on the SSD tier, bf16, pieces of 4096 elements (several per group): losses, the saved
    weights and moments, and the most optimizer slots the run held at once."""
    monkeypatch.setattr(MemAscend, "update_depth", depth)
    monkeypatch.setattr(MemAscend, "PIECE_CAP", 4096)
    if lazy:
        def aio(self):
            if self.engine is None:
                self.engine = LazyEngine(block_size=1 << 12, queue_depth=2)  # several blocks a piece
            return self.engine
        monkeypatch.setattr(HostMemoryDesign, "aio", aio)
    held = {"slots": 0}
    real_close = store_mod.GroupStore.close

    def close(self):
        held["slots"] = max(held["slots"], self.opt_pool.peak_in_use_slots)
        real_close(self)

    _fail_on_slot_wait(monkeypatch)
    monkeypatch.setattr(store_mod.GroupStore, "close", close)
    model = make_tiny(tmp_path / "m", tied=tied)
    res = run(cfg(model, tmp_path / name, steps=3, offload="ssd", host_memory="memascend", dtype="bfloat16",
                  save=str(tmp_path / f"ck-{name}")))
    monkeypatch.undo()
    return res.losses, _tensors(tmp_path / f"ck-{name}"), held["slots"]


@pytest.mark.parametrize("tied", [False, True])
def test_pipelined_update_equals_the_sequential_one_bit_for_bit(tmp_path, monkeypatch, tied):
    ref_losses, ref_state, ref_slots = _train(tmp_path, monkeypatch, "seq", 1, False, tied)
    losses, state, slots = _train(tmp_path, monkeypatch, "pipe", 3, True, tied)
    assert losses == ref_losses and losses[-1] < losses[0]
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    # depth 1 holds one set (master, moments); depth 3 keeps three in flight, each with its compute copy
    assert ref_slots == 3 and slots == 3 * 4


def _rival(tmp_path, monkeypatch, name: str, design: str, lazy: bool) -> tuple[list[float], dict, list[tuple]]:
    """3 steps of a ZeRO-Infinity design on the SSD tier, bf16 (its flat optimizer step): losses, the saved state,
    and the order in which the update read groups' pieces and ran AdamW on them."""
    if lazy:
        def aio(self):
            if self.engine is None:
                self.engine = LazyEngine(block_size=1 << 12, queue_depth=2)
            return self.engine
        monkeypatch.setattr(HostMemoryDesign, "aio", aio)
    events: list[tuple] = []
    real_read, real_update = store_mod.GroupStore._start_read_piece, store_mod.GroupStore.update_group

    def read(self, gi, *a, **k):
        events.append(("read", gi))
        return real_read(self, gi, *a, **k)

    def update(self, gi, *a, **k):
        real_update(self, gi, *a, **k)
        events.append(("updated", gi))

    _fail_on_slot_wait(monkeypatch)
    monkeypatch.setattr(store_mod.GroupStore, "_start_read_piece", read)
    monkeypatch.setattr(store_mod.GroupStore, "update_group", update)
    model = make_tiny(tmp_path / "m")
    res = run(cfg(model, tmp_path / name, steps=3, offload="ssd", host_memory=design, dtype="bfloat16",
                  save=str(tmp_path / f"ck-{name}")))
    monkeypatch.undo()
    return res.losses, _tensors(tmp_path / f"ck-{name}"), events


def test_pipelined_rival_reads_the_next_sub_group_during_this_ones_update(tmp_path, monkeypatch):
    """zero-infinity-pipelined (pipeline_read/pipeline_write) trains as zero-infinity-tuned bit for bit, and its
    optimizer step reads each next group's state before this group's update is done, where the tuned one reads it
    after (a rival without that read-ahead would only defer its writes)."""
    ref_losses, ref_state, ref_events = _rival(tmp_path, monkeypatch, "tuned", "zero-infinity-tuned", False)
    losses, state, events = _rival(tmp_path, monkeypatch, "pipe", "zero-infinity-pipelined", True)
    assert losses == ref_losses and losses[-1] < losses[0]
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)

    def read_ahead(evs: list[tuple]) -> list[bool]:
        # for each update but a step's last: was the next group's first read issued while it ran (after the
        # previous update finished, before this one did)?
        out, since = [], 0
        for i, (kind, gi) in enumerate(evs):
            if kind == "updated":
                nxt = next((e for e in evs[i + 1 :] if e[0] == "updated"), None)
                if nxt is not None and nxt[1] == gi + 1:
                    out.append(("read", gi + 1) in evs[since:i])
                since = i + 1
        return out

    assert read_ahead(events) and all(read_ahead(events))
    assert read_ahead(ref_events) and not any(read_ahead(ref_events))


class _SlowWrites(LazyEngine):
    """Lazy, and each write block takes `delay` seconds more when first waited for; the main thread's time waiting
    for writes is added to `waited[-1]` (one entry a step: the test appends at each step's start)."""

    delay = 0.01

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.waited: list[float] = []

    def submit(self, write, fd, buf, nbytes, offset):
        futures = super().submit(write, fd, buf, nbytes, offset)
        return [_TimedWrite(f, self) for f in futures] if write else futures


class _TimedWrite:
    def __init__(self, future: LazyFuture, engine: _SlowWrites) -> None:
        self._future, self._engine, self._slept = future, engine, False

    def result(self, timeout: float | None = None) -> None:
        t0 = time.perf_counter()
        if not self._slept:
            self._slept = True
            time.sleep(self._engine.delay)
        self._future.result(timeout)
        if threading.current_thread() is threading.main_thread() and self._engine.waited:
            self._engine.waited[-1] += time.perf_counter() - t0


class _StepClock:
    """The test's own clock of each step, on the main thread: its span, from zero_grad (the step begins, and the
    store's update timers with it) to the end of its optimizer update (StepExecutor.step returns: streamed, its
    last writes are settled there; or the flat optimizer_step returns), and, within it, the time computing units
    (forward, the head, autograd's backward, the embedding's backward), none of which runs any part of an update.
    Each list has an entry a step."""

    def __init__(self, monkeypatch) -> None:
        self.span: list[float] = []
        self.compute: list[float] = []
        self._start, self._inside = 0.0, False
        for owner, name, wrap in ((store_mod.GroupStore, "zero_grad", self._begins), (StepExecutor, "step", self._ends),
                                  (store_mod.GroupStore, "optimizer_step", self._ends),
                                  (UnitRunner, "forward", self._computes), (UnitRunner, "head_step", self._computes),
                                  (torch.autograd, "backward", self._computes),
                                  (StepExecutor, "_embedding_backward", self._computes)):
            monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))

    def _begins(self, real):
        def f(*a, **k):
            self._start = time.perf_counter()
            self.span.append(0.0)
            self.compute.append(0.0)
            return real(*a, **k)
        return f

    def _ends(self, real):
        def f(*a, **k):
            out = real(*a, **k)
            self.span[-1] = time.perf_counter() - self._start
            return out
        return f

    def _computes(self, real):
        def f(*a, **k):
            if self._inside or threading.current_thread() is not threading.main_thread() or not self.span:
                return real(*a, **k)  # nested in a timed call, or not the step's main thread
            self._inside, t0 = True, time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self._inside = False
                self.compute[-1] += time.perf_counter() - t0
        return f


@pytest.mark.parametrize("design", ["memascend", "zero-infinity-pipelined"])
def test_update_seconds_count_the_writes_a_pipelined_update_leaves_in_flight(tmp_path, monkeypatch, design):
    """A step's optimizer_seconds holds every wait of the step for the update's writes, those a pipelined update
    leaves in flight at a group's end and waits for later (at the step's end: optimizer_settle_seconds) included.
    Each write block here takes 10 ms when waited for, so the step's end alone waits for tens of them.
    And it holds nothing more: the update's time and the units' compute are disjoint parts of the step, so
    together they fit in the step's span as the test's own clock measures it (a wait counted twice, or a write's
    whole flight from its submission counted instead of the wait, does not fit: the settle alone is ~0.6 s here
    and the step's time in neither part ~0.01 s)."""
    engines: list[_SlowWrites] = []

    def aio(self):
        if self.engine is None:
            self.engine = _SlowWrites(block_size=1 << 16, queue_depth=2)
            engines.append(self.engine)
        return self.engine

    real_zero = store_mod.GroupStore.zero_grad

    def zero_grad(self):  # a step begins (the only writes in a step are the update's)
        engines[-1].waited.append(0.0)
        real_zero(self)

    monkeypatch.setattr(HostMemoryDesign, "aio", aio)
    monkeypatch.setattr(store_mod.GroupStore, "zero_grad", zero_grad)
    clock = _StepClock(monkeypatch)  # wraps zero_grad in turn: both run at a step's start
    model = make_tiny(tmp_path / "m")
    res = run(cfg(model, tmp_path / "run", steps=2, offload="ssd", host_memory=design, dtype="bfloat16"))
    waited = engines[-1].waited
    assert len(waited) == len(res.optimizer_seconds) == len(res.optimizer_settle_seconds) == len(clock.span) == 2
    for s in range(2):
        assert waited[s] > 0.05, waited  # the delay took effect
        assert res.optimizer_seconds[s] >= waited[s], (s, res.optimizer_seconds, waited)
        # pipelined: the last group's writes were still in flight when its update returned
        assert 0 < res.optimizer_settle_seconds[s] <= res.optimizer_seconds[s]
        assert res.optimizer_settle_seconds[s] >= _SlowWrites.delay
        # from above: the update's time fits in the step beside the units' compute (an exact bound: disjoint
        # intervals of one clock inside the span)
        assert 0 < clock.compute[s] and res.optimizer_seconds[s] + clock.compute[s] <= clock.span[s], (
            s, res.optimizer_seconds, clock.compute, clock.span)
