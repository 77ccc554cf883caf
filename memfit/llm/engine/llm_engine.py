"""LLMEngine (step-wise, for servers): the engine builds its parts, then `step()` runs them.

`LLMEngine.step()` is schedule -> run -> post-process. Data flows one way:
scheduler (decides) -> KV manager (reserves) -> runner (computes, samples) -> post-process (detokenize,
stop checks) -> outputs. Which kernels run is decided once, in memfit.llm.kernels.backends; the server
reaches the engine only through the `EngineClient` calls (engine/protocol.py).
"""
from __future__ import annotations

import itertools
import logging
import time

from memfit.llm.engine import admission, ledger, step_arena
from memfit.llm.engine.admission import check_priority
from memfit.llm.engine.config import EngineConfig
from memfit.llm.engine.draft import Draft
from memfit.llm.engine.engine_stats import engine_stats, record_timeline
from memfit.llm.engine.errors import QueueFull, RequestError
from memfit.llm.engine.outputs import CompletionOutput, RequestOutput
from memfit.llm.engine.params import SamplingParams
from memfit.llm.engine.protocol import ModelInfo
from memfit.llm.engine.request import Sequence
from memfit.llm.engine.policy import PolicyConfig
from memfit.llm.engine.scheduler import Scheduler, SchedulerConfig
from memfit.llm.engine.sessions import adopt_session_kv
from memfit.llm.engine.swap_tiers import build_swap
from memfit.llm.engine.textstream import TextStream
from memfit.llm.kernels.backends import BackendOptions, prepare_model
from memfit.llm.kv import KVLayout, create_kv_cache, kv_cache_class
from memfit.llm.models.config import ModelConfig, parse_dtype
from memfit.llm.models.loader import resolve_model_path
from memfit.llm.models.tokenizer import Tokenizer
from memfit.llm.parallel import launch as tensor_parallel
from memfit.llm.parallel import rank
from memfit.memory.heap import HeapTrimmer, IdleTrimmer
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, Tier, format_bytes

__all__ = ["EngineConfig", "LLMEngine", "QueueFull", "RequestError"]

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides) -> None:
        config = (config or EngineConfig()).with_overrides(**overrides)
        self.config = config
        # Tensor parallelism (memfit/llm/parallel/): this process's rank; a torchrun worker never returns from here.
        # The rest of its wiring (shard, mirrored KV decisions, runner) is parallel/rank.py: each call is the
        # plain engine's when self.tp is None.
        self.tp = tensor_parallel.join(config, type(self))
        rank.set_threads(config, self.tp)
        kv_class = kv_cache_class(config.kv_cache)  # an unknown kind fails before the model loads
        backend_options = BackendOptions(max_num_seqs=config.max_num_seqs, prepack=config.prepack, fuse=config.fuse,
                                         cpu_linear=config.cpu_linear, cpu_kernels=config.cpu_kernels,
                                         max_rows=config.max_num_batched_tokens,
                                         head_rows=ledger.engine_head_rows(config))
        self.device = config.resolved_device() if self.tp is None else self.tp.device
        path = resolve_model_path(config.model)
        # The ledger first, from the memory available *before* loading: every part is reserved in it before
        # it is allocated, and a model that cannot fit is refused before a byte of it is read.
        self.ledger = MemoryBudget(ledger.ledger_bytes(config, self.device), Tier.DEVICE, name="memory_budget")
        # Under a budget the user set, the C heap's freed pages are given back when the process nears it
        # (memory/heap.py: otherwise they pile up step after step, outside every reservation).
        cpu_budget = config.memory_budget is not None and self.device.type == "cpu"
        self._heap = HeapTrimmer(self.ledger.limit_bytes) if cpu_budget else None
        self._idle_heap = IdleTrimmer(config.kv_reclaim_idle_s)  # and, budget or not, once per idle period
        stored = rank.model_config(ModelConfig.from_dir(path), self.tp)  # under TP, this rank's share
        dtype = parse_dtype(config.dtype) if config.dtype else parse_dtype(stored.torch_dtype)
        self.max_model_len = min(config.max_model_len or stored.max_position_embeddings, stored.max_position_embeddings)
        if config.max_model_len is not None and config.max_model_len > stored.max_position_embeddings:
            log.warning("max_model_len %d is past the model's %d positions; sequences are capped at %d tokens",
                        config.max_model_len, stored.max_position_embeddings, self.max_model_len)
        self.memory_plan = ledger.plan_memory(config, self.device, path, stored, dtype, backend_options,
                                              self.max_model_len, sharded=self.tp is not None)
        ledger.reserve_fixed(self.ledger, self.memory_plan)
        self.model, self.model_config = rank.load(path, dtype, self.device, self.tp)
        self.model.rotary.limit(self.max_model_len)  # RoPE tables for the positions the engine can reach
        self.dtype = next(self.model.parameters()).dtype
        self.backends = prepare_model(self.model, backend_options, self.device)
        rank.parallelize(self.model, self.tp, self.model_config.vocab_size)
        self.tokenizer = Tokenizer.from_dir(path)
        mc = self.model_config
        self.layout = KVLayout(mc.num_hidden_layers, rank.kv_heads(mc, self.tp), mc.head_dim, self.dtype,
                               self.max_model_len, self.device)
        # Speculative decoding: the draft's weights and KV share are reserved before the target's KV share.
        # Under TP the draft runs on rank 0 only (docs/parallel.md): the workers verify, they never draft.
        drafts = config.speculative_model and (self.tp is None or self.tp.is_driver)
        self.draft = Draft.load(self, backend_options) if drafts else None
        # A worker verifies rank 0's drafts: the gathered logits and a tree's masks go in its own ledger.
        rank.reserve_verification(self.ledger, stored, config, self.max_model_len, dtype, self.tp)
        # The KV cache's share: what the ledger has left, capped by kv_budget (or by what every slot could hold).
        kv_opts = kv_class.engine_options(max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                                          kv_layout=config.kv_layout, prefault=config.kv_prefault,
                                          eager_pages=config.kv_eager_pages,
                                          prefix_caching=config.enable_prefix_caching,
                                          block_groups=config.kv_block_groups)
        ledger.reserve_ssd_staging(config, self.ledger, self.device)  # the SSD tier's O_DIRECT buffers, on a CPU
        kv_share = ledger.kv_share_bytes(config, self.ledger, self.device,
                                         kv_class.all_slots_bytes(self.layout, config.max_num_seqs, **kv_opts),
                                         self.draft.kv_budget.limit_bytes if self.draft is not None else 0)
        self.kv_budget = MemoryBudget(rank.agree_kv_share(kv_share, self.tp), Tier.DEVICE, name="kv_budget",
                                      parent=self.ledger)
        self.kv_reclaim_watermark = ledger.watermark_bytes(config.kv_reclaim_watermark, self.kv_budget.limit_bytes)
        shard_kv = create_kv_cache(config.kv_cache, self.layout, self.kv_budget, **kv_opts)
        self.kv = rank.mirror_kv(shard_kv, self.tp)  # under TP, rank 0's logs its decisions for the workers
        if self.kv.bytes_needed(2) > self.kv_budget.limit_bytes:  # else it starts, then refuses every request
            shard_kv.close()
            raise MemoryBudgetExceeded(
                f"the KV cache's share ({format_bytes(self.kv_budget.limit_bytes)}) cannot hold one sequence of 2 "
                f"tokens ({format_bytes(self.kv.bytes_needed(2))}); raise --kv-budget or --memory-budget")
        self.swap = build_swap(config, self.kv, self.ledger, self.device, self.model, mc)  # engine/swap_tiers.py
        policy = PolicyConfig(config.scheduling_policy, aging_steps=config.priority_aging_steps)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting, policy,
                            config.preemption_mode),
            self.kv, self.swap,
        )
        self.runner = rank.make_runner(self.model, self.kv, shard_kv, self.device, self.tp, self.backends)
        self.runner.scratch = step_arena.build(self.ledger, [self.model] + ([self.draft.model] if self.draft else []),
                                               self.device, config.max_num_batched_tokens, self.tp)
        self.spec = self.draft.decoder(self) if self.draft is not None else None  # engine/spec_decode.py
        # the draft cache's own watermark: a fraction (kv_reclaim_watermark) is of its own share, not the target's
        self._draft_watermark = (ledger.watermark_bytes(config.kv_reclaim_watermark, self.spec.draft_kv.budget.limit_bytes)
                                 if self.spec is not None else 0)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._model_info = ModelInfo(
            model_path=str(path), max_model_len=self.max_model_len, vocab_size=mc.vocab_size,
            dtype=str(self.dtype).replace("torch.", ""), device=str(self.device), kv_cache=config.kv_cache,
            kv_budget_bytes=self.kv_budget.limit_bytes, tokenizer=self.tokenizer, max_waiting=config.max_waiting,
        )
        self._seqs: dict[str, Sequence] = {}
        self._streams: dict[str, TextStream] = {}
        self._counter = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.prefault_failures = 0
        self.timeline = None
        if config.timeline:
            from memfit.memory.timeline import MemoryTimeline

            self.timeline = MemoryTimeline(jsonl_path=config.timeline)

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    def maintain(self, now: float | None = None) -> None:
        """Housekeeping between steps and while idle (the server calls it when it has nothing to run): give
        back KV pages idle past the watermark for `kv_reclaim_idle_s` (less the slots the waiting requests are about
        to take: `_slots_wanted`), report failed background commits, and trim the C heap under a memory budget when
        the process nears it, and once idle for `kv_reclaim_idle_s` (with the host swap tier's cached pages and the
        step arena's pages)."""
        now = time.monotonic() if now is None else now
        failures = self.kv.take_prefault_failures()
        if failures:
            self.prefault_failures += len(failures)
            log.warning("%d background KV commit(s) failed and were rolled back: %s", len(failures), failures[0])
        if self.tp is None or not self.kv.prefix_caching:  # under TP, evicting cached prefixes by the clock
            self.kv.reclaim_idle(self.kv_reclaim_watermark, self.config.kv_reclaim_idle_s, now,  # would split the ranks
                                 keep_slots=self._slots_wanted())
        if self.spec is not None:
            self.spec.sweep()  # draft KV of finished, preempted or evicted sequences
            # freed draft slots keep their pages too (deferred reclamation): they go back on the same clock
            self.spec.draft_kv.reclaim_idle(self._draft_watermark, self.config.kv_reclaim_idle_s, now,
                                            keep_slots=self._slots_wanted())
        if self._heap is not None:
            self._heap.maybe_trim()
        if not self.scheduler.has_unfinished() and self._idle_heap.maybe_trim(now):
            if self.swap is not None:
                self.swap.trim()  # the host swap tier's warm free pages too, once per idle period
            if self.runner.scratch is not None:
                self.runner.scratch.trim(0)  # and the step arena's, kept warm while busy (engine/step_arena.py)

    def _slots_wanted(self) -> int:
        """How many sequences this step may place in new KV slots: the waiting ones, up to the free sequence slots.
        The idle reclaim keeps that many of the slots it would give back, pages committed, for them to take
        (deferred reclamation, kv/virtual.py); a server with nobody waiting gives back everything due."""
        sched = self.scheduler
        # a sequence swapping in or out already holds (or is leaving) its slot; a retained session's finished
        # sequence holds one in the cache as a running one does
        placing = sum(1 for s in sched.waiting if not (s.swapping_in or s.swapping_out))
        return max(0, min(placing, self.config.max_num_seqs - len(sched.running) - len(sched.retained)))

    # ---- requests --------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise what add_request would refuse this prompt for (RequestError, MemoryBudgetExceeded)."""
        admission.check_prompt(prompt_token_ids, self.model_config.vocab_size, self.max_model_len)
        total = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        admission.check_fits_budget(self.kv, self.kv_budget, self.ledger, total)

    def max_new_tokens(self, prompt_len: int) -> int:
        """What the context leaves after the prompt, shortened until one sequence fits the KV budget."""
        return admission.max_new_tokens(self.kv, self.kv_budget.limit_bytes, self.max_model_len, prompt_len)

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        session_id: str | None = None,
        priority: int = 0,
        user: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        check_priority(priority)
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("give a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        self.validate(prompt_token_ids, params)
        if self.config.max_waiting is not None and len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting (limit {self.config.max_waiting})")
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, self.max_model_len, session_id,
                       priority=priority, user=user)
        if session_id is not None:  # the previous turn's KV, up to the common prefix (engine/sessions.py)
            adopt_session_kv(seq, self.scheduler, self.kv, self.swap, self.spec)
        self._seqs[request_id] = seq
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return request_id

    def set_priority(self, request_id: str, priority: int) -> None:
        """Change a queued or running request's priority; it takes effect at the next step. Raises KeyError for
        an unknown or finished request and RequestError for a priority that is not an integer."""
        check_priority(priority)
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            raise KeyError(f"no running or queued request {request_id!r}")
        self.scheduler.set_priority(seq, priority)

    def end_session(self, session_id: str) -> None:
        self.scheduler.drop_retained(session_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV; an unknown or finished id is ignored."""
        seq = self._seqs.pop(request_id, None)
        self._streams.pop(request_id, None)
        self.runner.release(request_id)
        if seq is not None and self.spec is not None:
            self.spec.release(seq.seq_id)
        if seq is not None and not seq.is_finished:
            self.scheduler.abort(seq)

    abort_request = abort  # vLLM's name

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.maintain()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                head = self.scheduler.waiting[0]
                raise MemoryBudgetExceeded(
                    f"request {head.request_id} cannot be scheduled: the KV budget "
                    f"({format_bytes(self.kv_budget.limit_bytes)}) has no room even with nothing running",
                    request_id=head.request_id,
                )
            return []
        self._idle_heap.busy(time.monotonic())
        t0 = time.perf_counter()
        result = self.spec.execute(sched) if self.spec is not None else self.runner.execute(sched.scheduled)
        if self.swap is not None and self.swap.cost is not None and sched.num_tokens >= 16:
            self.swap.cost.observe_compute(sched.num_tokens, time.perf_counter() - t0)  # auto mode's rate
        self.num_steps += 1
        outputs = []
        for seq, token, logprobs in zip(result.sampled_seqs, result.token_ids, result.logprobs):
            if seq.is_finished:
                continue  # speculation emitted tokens past a stop: they are dropped
            seq.append_token(token, logprobs)
            self.num_generated_tokens += 1
            stream = self._streams[seq.request_id]
            stream.add(seq.output_token_ids)
            reason = "stop" if stream.stopped else seq.check_token_stop()
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq, stream))
        if self.timeline is not None:
            record_timeline(self, sched.num_tokens)
        return outputs

    def _output(self, seq: Sequence, stream: TextStream) -> RequestOutput:
        finished = seq.is_finished
        text, delta = stream.emit(final=finished)
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(seq.output_token_ids), logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason if finished else None, delta_text=delta,
        )
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, outputs=[completion], finished=finished,
            num_cached_tokens=seq.num_cached_prompt,
        )
        if finished:
            self._seqs.pop(seq.request_id, None)
            self._streams.pop(seq.request_id, None)
            self.runner.release(seq.request_id)
            if self.spec is not None:
                self.spec.finished(seq)  # the draft's KV: freed, or kept with the target's for the session's next turn
        return out

    def stats(self) -> dict:
        """A fresh snapshot for metrics (the server's /metrics, `memfit bench`): engine_stats.py."""
        return engine_stats(self)

    def close(self) -> None:
        if self.spec is not None:
            self.spec.close()
        if self.swap is not None:
            self.swap.close()
        self.kv.close()
        if self.runner.scratch is not None:
            self.runner.scratch.close()
            self.runner.scratch = None
        if self.tp is not None and self.tp.is_driver:
            self.tp.shutdown()

