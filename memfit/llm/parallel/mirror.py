"""Keeping every rank's KV cache and step in lockstep with rank 0's, which alone schedules.

Rank 0's scheduler decides, and its KV manager (holding heads [0, Hkv/N)) answers allocate / grow / free. The
workers' managers hold the other heads of the *same* sequences, so they must make the same decisions:
`RecordingKV` wraps rank 0's manager for the scheduler and the engine and logs every call that changes which
tokens a sequence holds; each step's `StepMessage` carries that log and the step's sequences (ids, positions,
tokens, in rank 0's batch order); a worker replays the log on its own manager, checking every answer equals
rank 0's (same budget, same calls: a difference is a bug, reported as one rather than decoded into garbage),
then runs the same batch.

The message is plain data (pickled by torch.distributed's broadcast_object_list on the gloo control group):
a decode step of 32 sequences is ~1 KiB.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from memfit.llm.engine.runner import ModelRunner
from memfit.llm.engine.spec_forward import forward
from memfit.llm.engine.spec_tree import TokenTree
from memfit.llm.engine.spec_tree_forward import TreeChunk, compact, tree_forward
from memfit.llm.engine.step import ScheduledSeq, StepResult
from memfit.llm.parallel.group import TPGroup

# The manager calls that change what a sequence holds (scheduler.py and engine/sessions.py make them); their answers
# are checked on replay. Everything else (plan_step, write, stats, ...) is each rank's own business.
LOGGED = ("try_allocate", "try_allocate_prefix", "try_grow", "free", "truncate", "mark_restored")
# Logged beside them, in order, though not manager calls: a token tree's accepted path moved into place
# (engine/spec_tree_forward.compact), which must happen on every rank before the truncations that follow it.
COMPACT = "compact_tree"


class ReplayMismatch(RuntimeError):
    """A worker's KV manager answered a logged call differently from rank 0's."""


@dataclass
class WireSeq:
    seq_id: int
    request_id: str
    start: int  # tokens already computed (the step feeds start .. start + len(tokens))
    tokens: list[int]
    samples: bool


@dataclass
class StepMessage:
    ops: list[tuple[str, tuple, Any]] = field(default_factory=list)  # (method, args, rank 0's answer)
    seqs: list[WireSeq] = field(default_factory=list)  # rank 0's batch order
    # speculative verification (engine/spec_forward.py): chunks (seq_id, start, tokens) and whether every row's
    # logits are gathered; None for an ordinary step
    chunks: list[tuple[int, int, list[int]]] | None = None
    all_rows: bool = False
    # token-tree verification (engine/spec_tree_step.py): (seq_id, base, tree) per sequence, every node fed
    trees: list[tuple[int, int, TokenTree]] | None = None


class RecordingKV:
    """Rank 0's KV manager as the scheduler and engine see it: every LOGGED call is made and logged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._log: list[tuple[str, tuple, Any]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in LOGGED:
            return attr

        def logged(*args: Any) -> Any:
            result = attr(*args)
            self._log.append((name, tuple(list(a) if isinstance(a, (list, tuple)) else a for a in args), result))
            return result

        return logged

    def note(self, name: str, args: tuple) -> None:
        """Log an operation on the cache that is not a manager call (COMPACT), for the workers to replay in order."""
        self._log.append((name, args, None))

    def take_log(self) -> list[tuple[str, tuple, Any]]:
        log, self._log = self._log, []
        return log


def replay(kv: Any, ops: list[tuple[str, tuple, Any]], rank: int) -> None:
    for name, args, expected in ops:
        if name == COMPACT:
            compact(kv, *args)
            continue
        got = getattr(kv, name)(*args)
        if got != expected:
            raise ReplayMismatch(f"rank {rank}: KV {name}{args[:2]} answered {got!r}, rank 0 answered {expected!r}; "
                                 "the ranks' caches diverged")


class MirrorSeq:
    """What a worker's runner needs of a sequence: its id, the step's tokens and positions."""

    params = None

    def __init__(self, w: WireSeq) -> None:
        self.seq_id, self.request_id, self.num_computed = w.seq_id, w.request_id, w.start
        self._start, self._tokens = w.start, w.tokens
        # ScheduledSeq.samples compares num_computed + num_new with num_tokens: one more pending token if not
        self.num_tokens = w.start + len(w.tokens) + (0 if w.samples else 1)

    def token_slice(self, a: int, b: int) -> list[int]:
        return self._tokens[a - self._start:b - self._start]


class DriverRunner:
    """Rank 0's runner: sends each step to the workers, then runs its own shard of it (and samples)."""

    def __init__(self, inner: ModelRunner, kv: RecordingKV, group: TPGroup) -> None:
        self.inner, self.kv, self.group = inner, kv, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, scheduled: list[ScheduledSeq]) -> StepResult:
        ordered, _ = self.inner._order(scheduled)  # the runner orders the same way again (a stable sort)
        seqs = [WireSeq(s.seq.seq_id, s.seq.request_id, s.seq.num_computed,
                        s.seq.token_slice(s.seq.num_computed, s.seq.num_computed + s.num_new), s.samples)
                for s in ordered]
        self.group.send(StepMessage(self.kv.take_log(), seqs))
        try:
            return self.inner.execute(ordered)
        except Exception as exc:
            text = str(exc).lower()  # gloo raises plain RuntimeErrors: known by their text
            if self.group.dead_workers() or any(w in text for w in ("gloo", "connection", "timed out")):
                raise self.group.failure(exc) from exc
            raise

    def forward_chunks(self, chunks: list[tuple[int, int, list[int]]], all_rows: bool) -> torch.Tensor:
        """Speculative verification over the target's shards: the workers run the same pass."""
        self.group.send(StepMessage(self.kv.take_log(), chunks=chunks, all_rows=all_rows))
        try:
            return forward(self, chunks, all_rows)  # type: ignore[arg-type]
        except Exception as exc:
            if self.group.dead_workers():
                raise self.group.failure(exc) from exc
            raise

    def forward_tree(self, chunks: list[TreeChunk]) -> torch.Tensor:
        """A token tree's verification over the target's shards (every node of each tree): the workers run the
        same pass under the same masks."""
        trees = [(c.seq_id, c.base, c.tree) for c in chunks]
        self.group.send(StepMessage(self.kv.take_log(), trees=trees))
        try:
            return tree_forward(self, chunks)  # type: ignore[arg-type]
        except Exception as exc:
            if self.group.dead_workers():
                raise self.group.failure(exc) from exc
            raise

    def compact_tree(self, moves: list[tuple[int, int, TokenTree, list[int]]]) -> None:
        """Move each accepted path into place in rank 0's shard, and log it for the workers' (before the
        truncations the caller makes next, which are logged after it)."""
        self.kv.note(COMPACT, (moves,))
        compact(self.kv, moves)


class ShardRunner(ModelRunner):
    """A worker's runner: runs rank 0's batch in rank 0's order; rank 0 samples, so it samples nothing."""

    def _order(self, scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], int]:
        num_decode = sum(1 for s in scheduled if s.num_new == 1 and s.seq.num_computed > 0)
        return scheduled, num_decode

    def _sample(self, logits, sampled) -> StepResult:  # noqa: ANN001
        return StepResult([], [], [])

    def run_message(self, msg: StepMessage) -> None:
        if msg.chunks is not None:
            forward(self, msg.chunks, msg.all_rows)  # its share of a verification pass; rank 0 samples
            return
        if msg.trees is not None:  # its share of a tree's verification pass; rank 0 walks the verdict
            tree_forward(self, [TreeChunk(s, base, tree, 0, len(tree), tree.ancestor_mask()) for s, base, tree in msg.trees])
            return
        self.execute([ScheduledSeq(MirrorSeq(w), len(w.tokens)) for w in msg.seqs])  # type: ignore[arg-type]
