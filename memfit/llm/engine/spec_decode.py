"""Speculative decoding in the engine: a draft model proposes, the target verifies in one pass per step.

    scheduler -> SpecDecoder.execute(sched) -> StepResult (a sequence appears once per emitted token)

The scheduler is unchanged: it schedules a decoding sequence for one token, as always. For those sequences
this step becomes speculative:
1. room: the target's KV grows by g lookahead tokens and the draft's KV to the sequence's length + g - 1
   (`try_grow`, by attempt); where memory or the step's token budget is short, g shrinks for that sequence,
   down to plain decoding (g = 0), so speculation gives way before anyone is preempted;
2. draft: one pass feeds the draft what it has not seen (the whole prompt the first time, then the one or
   two tokens the last verification emitted) and draws x_1; g - 1 one-token passes draw x_2..x_g;
3. verify: one target pass over [last token, x_1..x_g] per sequence (a g+1-token chunk; through the C++ decode
   stack where the target has one, at about a decode step's cost, else as chunked prefill runs it) gives p at
   every position; `speculative.rejection_sample` keeps n drafts and emits n+1 tokens;
4. roll back: the K/V written for rejected drafts is truncated in both caches (`truncate`), so the caches
   hold exactly the tokens the sequence has.
Prefill chunks run through the ordinary `ModelRunner.execute` in the same step; one-token decode rows left with
g = 0 join the verification pass (a row each, nothing drafted) rather than cost a target pass of their own, and go
through `ModelRunner.execute` only when nobody speculates.
Multi-turn: when a sequence with a session finishes, the draft keeps its KV as the target's cache does
(`finished`); the next turn adopts both up to the common prefix (`adopt`), so the draft only catches up on the new
tokens. A retained draft KV goes when the target's does (evicted under pressure, session ended), and first when
the draft's own cache is short of room.

Adaptive g (`speculative_adaptive`): each sequence's acceptance rate is tracked from its verifications
(`AcceptanceTracker`) and the cost of a draft pass relative to a target pass is timed (running medians of the
last COST_WINDOW timings); each step a sequence asks for the g that emits the most tokens per unit of time
(`best_gamma`), 0 when plain decoding is faster, with a one-draft probe every PROBE_EVERY steps so its estimate stays fresh. The room of step 1 can only
lower that g further.

Token trees (`speculative_tree` W,D): sequences draft a tree instead of a chain and the target verifies it under
a tree mask (engine/spec_tree_step.py): greedy ones by the target's argmax, sampled ones by SpecInfer's
multi-candidate rejection rule (engine/spec_tree_sample.py). With `speculative_adaptive` too, each step drafts
trees or (adaptive) chains, whichever emitted more tokens per second in recent decode-only steps (`TreeOrChain`).

Only the runners (target and draft) touch device memory; the draft's KV is a cache of its own, with a
budget that is a child of the engine's ledger, like the target's.
"""
from __future__ import annotations

import statistics
import time
from collections import deque

import torch

from memfit.llm.engine.request import Sequence, SeqStatus
from memfit.llm.engine.runner import ModelRunner
from memfit.llm.engine.spec_chain_step import speculate_chain
from memfit.llm.engine.spec_forward import forward
from memfit.llm.engine.spec_stats import SpecStats
from memfit.llm.engine.spec_tree_step import TreeOrChain, speculate_tree, tree_shape
from memfit.llm.engine.speculative import AcceptanceTracker, best_gamma
from memfit.llm.engine.step import ScheduledSeq, SchedulerOutput, StepResult
from memfit.llm.kernels import large_m
from memfit.llm.kv.base import KVCacheManager


PROBE_EVERY = 16  # adaptive g: a sequence decoding plainly speculates one token this often, to re-measure
COST_WINDOW = 15  # adaptive g: each pass's cost is the median of this many recent timings


class SpecDecoder:
    """Owns the draft (model, runner, KV cache) and runs the speculative part of each engine step."""

    def __init__(self, target: ModelRunner, draft: ModelRunner, num_speculative_tokens: int,
                 max_num_batched_tokens: int, adaptive: bool = False,
                 tree: tuple[int, int] | None = None) -> None:
        self.target = target
        self.draft = draft
        self.gamma = num_speculative_tokens
        self.max_num_batched_tokens = max_num_batched_tokens
        self.sampler = target.sampler  # the requests' generators: one stream per request, as without a draft
        self._drafted: dict[int, Sequence] = {}  # seq_id -> the sequence whose tokens the draft KV holds
        self._retained: dict[int, None] = {}  # seq_ids of finished turns whose draft KV waits for the next turn (LRU)
        self.stats = SpecStats()
        self.adaptive = adaptive
        self.tree = tree  # (W, D): draft a token tree instead of a chain (engine/spec_tree_step.py)
        # adaptive with a tree: trees or chains for greedy rows, step by step, whichever emits more tokens a second
        self.chooser = TreeOrChain(PROBE_EVERY, COST_WINDOW) if tree and adaptive else None
        self._shapes: dict[int, tuple[int, int]] = {}  # tree mode: seq_id -> this step's (w, d)
        self._trackers: dict[int, AcceptanceTracker] = {}  # seq_id -> its acceptance (adaptive g)
        self._plain_steps: dict[int, int] = {}  # seq_id -> steps decoded plainly since its last probe
        # seconds per draft pass, verification pass and plain decode step (adaptive g): medians of recent timings
        self._t: dict[str, float] = {}
        self._recent: dict[str, deque[float]] = {}

    @property
    def draft_kv(self) -> KVCacheManager:
        return self.draft.kv

    # ---- bookkeeping ------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Free the draft KV of sequences that finished, were aborted or were preempted since the last step, and
        of retained turns whose target KV is gone (evicted, or the session ended)."""
        for seq_id, seq in list(self._drafted.items()):
            if seq_id in self._retained:
                if not self.target.kv.has_seq(seq_id):
                    self.release(seq_id)
            elif seq.seq_id != seq_id or seq.status is SeqStatus.FINISHED or (
                    seq.status is SeqStatus.WAITING and (seq.num_computed == 0 or seq.swapped)):
                self.release(seq_id)  # a new turn waiting with its adopted KV (num_computed > 0) keeps it

    def finished(self, seq: Sequence) -> None:
        """A sequence is done: keep its draft KV if the target keeps its KV for the session's next turn."""
        if seq.session_id is not None and seq.finish_reason != "abort" and self.target.kv.has_seq(seq.seq_id) \
                and seq.seq_id in self._drafted:
            self._retained[seq.seq_id] = None
        else:
            self.release(seq.seq_id)

    def adopt(self, seq_id: int, seq: Sequence, num_tokens: int) -> None:
        """The session's next turn `seq` takes over the retained `seq_id`, whose first `num_tokens` tokens it
        shares (0: nothing shared, the target frees its KV)."""
        if seq_id not in self._retained:
            return
        del self._retained[seq_id]
        if num_tokens == 0:
            self.release(seq_id)
            return
        self.draft_kv.truncate(seq_id, min(num_tokens, self.draft_kv.num_tokens(seq_id)))
        self._drafted[seq_id] = seq

    def _evict_retained(self) -> bool:
        """Free the least recently retained draft KV; False when none is left."""
        if not self._retained:
            return False
        self.release(next(iter(self._retained)))
        return True

    def release(self, seq_id: int) -> None:
        self._drafted.pop(seq_id, None)
        self._retained.pop(seq_id, None)
        self._trackers.pop(seq_id, None)
        self._plain_steps.pop(seq_id, None)
        if self.draft_kv.has_seq(seq_id):
            self.draft_kv.free(seq_id)

    def _want(self, seq: Sequence) -> int:
        """The g this sequence asks for: the largest allowed, or with adaptive g the fastest predicted one."""
        if not self.adaptive:
            return self.gamma
        tracker = self._trackers.setdefault(seq.seq_id, AcceptanceTracker())
        draft_cost, verify_cost = self.costs()
        g = best_gamma(tracker.alpha, draft_cost, self.gamma, verify_cost)  # unmeasured: speculate, to time it
        if g == 0:
            self.stats.chose_plain += 1
            waited = self._plain_steps.get(seq.seq_id, 0) + 1
            self._plain_steps[seq.seq_id] = 0 if waited >= PROBE_EVERY else waited
            return 1 if waited >= PROBE_EVERY else 0
        return g

    @staticmethod
    def _useful(seq: Sequence, gamma: int) -> int:
        """g capped so the step cannot pass the sequence's max_tokens or the context (more drafts are wasted)."""
        n = seq.num_tokens
        return max(0, min(gamma, seq.max_model_len - n, seq.params.max_tokens - len(seq.output_token_ids) - 1))

    def _room(self, seq: Sequence, gamma: int) -> int:
        """The largest g <= gamma both caches can hold for `seq` now (0: decode it plainly this step)."""
        n = seq.num_tokens
        while gamma > 0:
            if self.target.kv.try_grow(seq.seq_id, n + gamma) and self._draft_room(seq, n + gamma - 1):
                return gamma
            gamma -= 1
        return 0

    def _draft_room(self, seq: Sequence, num_tokens: int) -> bool:
        kv = self.draft_kv
        while True:
            if kv.has_seq(seq.seq_id):
                if kv.try_grow(seq.seq_id, num_tokens):
                    return True
            elif kv.try_allocate(seq.seq_id, num_tokens):
                self._drafted[seq.seq_id] = seq
                return True
            if not self._evict_retained():  # retained turns give way to running sequences
                return False

    # ---- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        self.sweep()
        self._shapes.clear()
        t_step = time.perf_counter()
        trees: bool | None = None  # this step drafts trees for greedy rows (decided at the first one)
        extra = self.max_num_batched_tokens - sched.num_tokens  # the step's token budget left for drafts
        spec: list[tuple[Sequence, int]] = []
        plain: list[ScheduledSeq] = []
        decode: list[ScheduledSeq] = []  # one-token decode rows left with g = 0
        for item in sched.scheduled:
            seq = item.seq
            gamma = 0
            decoding = item.num_new == 1 and seq.num_pending == 1 and seq.num_computed > 0
            if decoding and extra > 0 and self.tree and trees is None:
                trees = self.chooser.choose() if self.chooser else True
            if decoding and extra > 0 and trees:  # greedy and sampled rows alike (spec_tree_sample.py)
                w, d = self._shapes[seq.seq_id] = tree_shape(self, seq, *self.tree, extra)
                gamma = w * d
                self.stats.shrunk += w * d < self.tree[0] * self._useful(seq, self.tree[1])
            elif decoding and extra > 0:
                want = self._useful(seq, self._want(seq))
                gamma = self._room(seq, min(want, extra)) if want else 0
                self.stats.shrunk += gamma < want  # the token budget or memory was short
            if gamma:
                spec.append((seq, gamma))
                extra -= gamma
            elif decoding and item.samples:
                decode.append(item)
            else:
                plain.append(item)
        if spec:  # they ride in the verification pass (one row each, nothing drafted) instead of a pass of their own
            spec.extend((item.seq, 0) for item in decode)
            self.stats.folded += len(decode)
        else:
            plain.extend(decode)
        t0 = time.perf_counter()
        result = self.target.execute(plain) if plain else StepResult([], [], [])
        if plain and not spec and all(item.num_new == 1 for item in plain):
            self._observe("plain", time.perf_counter() - t0)
            self.stats.plain_s += time.perf_counter() - t0
            self.stats.plain_steps += 1
        if spec:
            self._speculate(spec, result)
        if trees is not None and self.chooser and all(item.num_new == 1 for item in sched.scheduled):
            self.chooser.observe(trees, len(result.token_ids), time.perf_counter() - t_step)  # decode-only steps
        return result

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Prefill the draft up to each sequence's last token in passes of at most max_num_batched_tokens tokens
        (the step the ledger reserved), so the first proposal pass feeds one or two tokens per sequence."""
        todo = [s for s in seqs if s.num_tokens - 1 - self.draft_kv.num_tokens(s.seq_id) > 1]
        while todo:
            chunks, used = [], 0
            for s in todo:
                start = self.draft_kv.num_tokens(s.seq_id)
                n = min(s.num_tokens - 1 - start, self.max_num_batched_tokens - used)
                if n <= 0:
                    break
                chunks.append((s.seq_id, start, s.token_slice(start, start + n)))
                used += n
            # A prefill of the draft: its many-row matmuls may take the prefill kernel (kernels/large_m.py). Only
            # proposals read the draft's K/V, so its bits never reach the output.
            with large_m.prefill_step():
                forward(self.draft, chunks, all_rows=False)  # K/V only: the logits are dropped
            todo = [s for s in todo if self.draft_kv.num_tokens(s.seq_id) < s.num_tokens - 1]

    def _speculate(self, spec: list[tuple[Sequence, int]], result: StepResult) -> None:
        """Draft, verify and roll back for `spec` (sequence, g) pairs; rows with g = 0 are plain decode rows that
        only take part in the verification pass (their token is the target's own pick or draw)."""
        if self.tree:  # rows of w >= 2 draft trees, the others chains, each kind in its own passes
            # a one-branch tree is a chain: it goes the chain's way, through the C++ decode stack where there is one
            shapes = self._shapes
            trees = [(s, *shapes[s.seq_id]) for s, g in spec if g and shapes.get(s.seq_id, (1,))[0] != 1]
            chains = [(s, shapes[s.seq_id][1] if s.seq_id in shapes else g) for s, g in spec
                      if g and shapes.get(s.seq_id, (1,))[0] == 1]
            for s, g in spec:  # plain rows ride in the tree pass if there is one, else in the chains' pass
                if not g:
                    (trees.append((s, 0, 0)) if trees else chains.append((s, 0)))
            if trees:
                speculate_tree(self, trees, result)
            if chains:
                speculate_chain(self, chains, result)
            return
        speculate_chain(self, spec, result)

    def _time(self, draft_s: float, passes: int, verify_s: float, kind: str = "") -> None:
        """Count a speculative step's pass times; kind "tree": a tree's passes, kept apart from the chain's costs
        (adaptive g's), which they would skew (they take the PyTorch path)."""
        self.stats.draft_s += draft_s
        self.stats.draft_passes += passes
        self.stats.verify_s += verify_s
        self._observe(kind + "draft", draft_s / passes)
        self._observe(kind + "verify", verify_s)

    def _observe(self, what: str, seconds: float) -> None:
        """The estimate of `what` is the median of its last COST_WINDOW timings: a step another process delayed
        (10x on a loaded machine, measured) would drag a moving average far off, and adaptive g with it."""
        recent = self._recent.setdefault(what, deque(maxlen=COST_WINDOW))
        recent.append(seconds)
        self._t[what] = statistics.median(recent)

    def costs(self) -> tuple[float, float]:
        """(draft pass, verification pass) in plain decode steps, from recent steps (running medians); before any
        plain step was timed, a verification pass stands for one; (0, 1) before any speculation was timed."""
        if "verify" not in self._t:
            return 0.0, 1.0
        plain = self._t.get("plain", self._t["verify"])
        return self._t["draft"] / plain, self._t["verify"] / plain

    def _logprobs(self, logits: torch.Tensor, seq: Sequence, tokens: list[int]) -> list:
        """The target's logprobs of each emitted token (logits: (n+1, V), one row per emitted token)."""
        if seq.params.logprobs is None:
            return [None] * len(tokens)
        t = torch.tensor(tokens, device=logits.device)
        return self.sampler._logprobs(logits.float(), [seq.params] * len(tokens), t)

    def stats_dict(self) -> dict:
        """The engine's `stats()["speculative"]`: acceptance, tokens per target pass and the draft's KV."""
        st = self.draft_kv.stats()
        return {**self.stats.as_dict(), "num_speculative_tokens": self.gamma,
                "draft_kv_committed_bytes": st.committed_bytes, "draft_kv_tokens_held": st.tokens_held,
                "draft_kv_budget_bytes": st.budget_bytes, "adaptive": self.adaptive,
                "tree": list(self.tree) if self.tree else None,
                **({"tree_steps": self.chooser.counts["tree"], "chain_steps": self.chooser.counts["chain"]}
                   if self.chooser else {})}

    def close(self) -> None:
        self.draft_kv.close()
