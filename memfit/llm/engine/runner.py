"""The model runner: the only component that owns device memory (weights and KV cache) and tensors.

It turns the scheduler's plain description of a step into batch tensors, runs the model with a
`CachedAttention` backend over the KV cache, projects only the positions that sample, and samples.
"""
from __future__ import annotations

import contextlib

import torch

from memfit.llm.kernels import large_m
from memfit.llm.kernels.attention import CachedAttention, Workspace
from memfit.llm.kernels.scratch_layout import step_regions
from memfit.llm.kv.base import KVCacheManager, SeqStep
from memfit.llm.models.llama import LlamaForCausalLM
from memfit.llm.engine.request import Sequence
from memfit.llm.engine.sampling import Sampler
from memfit.llm.engine.step import ScheduledSeq, StepResult
from memfit.memory.scratch import ScratchArena

SMALL_STEP = 64  # steps of up to this many tokens keep their exact size (decode batches)
STEP_BUCKET = 32  # larger steps are padded to a multiple of this


def bucket_tokens(n: int) -> int:
    """Rows the model computes for a step of `n` real tokens."""
    return n if n <= SMALL_STEP else -(-n // STEP_BUCKET) * STEP_BUCKET


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCacheManager, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.sampler = Sampler(model.ops)
        self.workspace = Workspace()  # decode attention's K/V copies reuse this memory across layers and steps
        self._by_slot = kv.fixed_stride  # the cache hands consecutive slots out as one view
        self.stack = None  # memfit.llm.kernels.stack.CpuDecodeStack, set by the engine where it can run
        # The step arena (memory/scratch.py) the model's intermediates are written into, set by the engine where
        # memfit's CPU kernels run (they take `out=`); None: every intermediate is a tensor of its own.
        self.scratch: ScratchArena | None = None

    def step_scratch(self, rows: int) -> contextlib.AbstractContextManager:
        """The step arena laid out for a model pass of `rows` rows (the padded step), active inside the block;
        a block without one where the runner has none. Views into it are valid until the next pass."""
        if self.scratch is None:
            return contextlib.nullcontext()
        layer = self.model.model.layers[0] if len(self.model.model.layers) else None
        block = getattr(getattr(layer, "mlp", None), "row_block", 0)
        dtype = self.model.model.norm.weight.dtype
        return self.scratch.step(step_regions(self.model.config, rows, dtype, block))

    def _order(self, scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], int]:
        """Decode sequences first (ordered by cache slot, so the virtual cache can hand out one strided
        view of consecutive slots instead of gathering), then prefill chunks."""
        decode = [s for s in scheduled if s.num_new == 1 and s.seq.num_computed > 0]
        prefill = [s for s in scheduled if not (s.num_new == 1 and s.seq.num_computed > 0)]
        if self._by_slot:
            decode.sort(key=lambda s: self.kv.slot_of(s.seq.seq_id))
        return decode + prefill, len(decode)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> StepResult:
        ordered, num_decode = self._order(scheduled)
        if (self.stack is not None and num_decode == len(ordered) <= self.stack.max_rows
                and all(item.samples for item in ordered)):
            if self.scratch is not None and self.scratch.committed_bytes:
                # a decode step runs outside the step arena: the pages a prefill step left there are given back
                # before it, not held through the decode that follows (the arena is warm between its own steps)
                self.scratch.trim(0)
            return self._execute_stack(ordered)
        input_ids: list[int] = []
        positions: list[int] = []
        steps: list[SeqStep] = []
        sample_rows: list[int] = []
        sampled = []
        for item in ordered:
            seq, start, n = item.seq, item.seq.num_computed, item.num_new
            tokens = seq.token_slice(start, start + n)
            input_ids.extend(tokens)
            positions.extend(range(start, start + n))
            steps.append(SeqStep(seq.seq_id, start, n, tokens))  # the cache hashes full blocks (prefix caching)
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        num_real = len(input_ids)
        # Pad the step to a bucketed size with dummy rows (token 0 at position 0, never written to the cache
        # nor sampled): the matmuls then see a bounded set of shapes, and oneDNN, which keeps a compiled
        # primitive per shape, stops growing memory with every new prefill length.
        padded = bucket_tokens(num_real)
        input_ids.extend([0] * (padded - num_real))
        positions.extend([0] * (padded - num_real))
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)  # (N,)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)  # (N,)
        cfg = self.model.config
        attn = CachedAttention(self.kv, steps, num_decode, self.model.scale, cfg.sliding_window, num_real,
                               self.workspace, self.model.ops)
        # A step with prefill rows may run its many-row matmuls on the kernel measured fastest for them
        # (kernels/large_m.py); a pure decode step keeps the decode kernels, whose bits its rows had before, and
        # so do the decode rows (the first num_decode) of a step that also carries prefill rows.
        with large_m.prefill_step(num_decode < len(ordered), num_decode), self.step_scratch(padded):
            # Only the sampled rows get the final norm: (S, C), outside the step arena.
            picked = self.model(ids_t, pos_t, attn, rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device))
        for item in ordered:
            item.seq.num_computed += item.num_new
        if not sampled:
            return StepResult([], [], [])
        return self._sample(self.model.compute_logits(picked), sampled)

    def _sample(self, logits: torch.Tensor, sampled: list[Sequence]) -> StepResult:
        """logits: (S, V) in the model dtype (the sampler widens), one row per sampling sequence."""
        generators = self.sampler.generators_for([(s.request_id, s.params.seed) for s in sampled])
        tokens, logprobs = self.sampler.sample(logits, [s.params for s in sampled], generators)
        return StepResult(sampled, tokens.tolist(), logprobs)

    def release(self, request_id: str) -> None:
        """A request is finished or aborted: drop what the runner kept for it (its sampling generator)."""
        self.sampler.release(request_id)

    def _execute_stack(self, ordered: list[ScheduledSeq]) -> StepResult:
        """A pure decode step of at most `stack.max_rows` sequences through the CPU decode stack (one C++ call)."""
        seqs = [item.seq for item in ordered]
        tokens = [s.token_slice(s.num_computed, s.num_computed + 1) for s in seqs]
        steps = [SeqStep(s.seq_id, s.num_computed, 1, t) for s, t in zip(seqs, tokens)]
        plan = self.kv.plan_step(steps)  # validates capacity and records the new tokens as held
        ids = torch.tensor([t[0] for t in tokens], dtype=torch.long)
        hidden = self.stack.run(ids, plan)  # (B, C)
        for s in seqs:
            s.num_computed += 1
        return self._sample(self.model.compute_logits(hidden), seqs)
