"""Fetching the weights of the units ahead of the one computing, on a thread (executor.py's step).

`Prefetcher` walks a step's fetch schedule (one list of group indices per unit, in the order the executor
computes them) on one thread, at most `depth` units ahead of the compute, so SSD reads (and host-to-device
copies on CUDA) overlap the compute of the unit in hand; a unit's pool slots go back as soon as the unit is
done. Kept apart from the executor: it knows the store's fetch and release only, nothing of the units' math.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from memfit.train.finetune.store import GroupStore

Fetched = list[tuple[torch.Tensor, torch.Tensor | None]]  # per group of a unit: (flat weights, pool slot or None)


class Prefetcher:
    def __init__(self, store: GroupStore, schedule: list[list[int]], depth: int) -> None:
        self.store = store
        self._room = threading.Semaphore(depth + 1)  # units fetched and not yet released
        self._stop = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="memfit-prefetch")
        self._futures: list[Future] = [self._pool.submit(self._fetch, gis) for gis in schedule]
        self._next = 0

    def _fetch(self, gis: list[int]) -> Fetched:
        self._room.acquire()
        if self._stop:
            return []
        return [self.store.fetch(gi) for gi in gis]

    def next(self) -> Fetched:
        """The next unit's fetched (flat weights, slot) per group, waiting for its reads."""
        fetched = self._futures[self._next].result()
        self._next += 1
        return fetched

    def done(self, fetched: Fetched) -> None:
        for _, slot in fetched:
            self.store.release(slot)
        self._room.release()

    def close(self) -> None:
        """Stop fetching and give back the slots of units fetched but never consumed (after an error)."""
        self._stop = True
        for _ in self._futures:
            self._room.release()
        for f in self._futures[self._next :]:
            try:
                fetched = f.result()
            except Exception:  # noqa: BLE001 (the error that stopped the step is the one to report)
                continue
            for _, slot in fetched:
                self.store.release(slot)
        self._pool.shutdown(wait=True)
