"""LLMEngine (step-wise, for servers) and LLM (batch `generate`, the API people know from vLLM).

`LLMEngine.step()` is schedule -> run -> post-process. Data flows one way:
scheduler (decides) -> KV manager (reserves) -> runner (computes, samples) -> post-process (detokenize,
stop checks) -> outputs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVLayout
from memfit.llm.loader import load_model, resolve_model_path
from memfit.llm.models.config import parse_dtype
from memfit.llm.outputs import CompletionOutput, RequestOutput
from memfit.llm.request import Sequence
from memfit.llm.runner import ModelRunner
from memfit.llm.sampling import SamplingParams, make_generator
from memfit.llm.scheduler import Scheduler, SchedulerConfig
from memfit.llm.textstream import TextStream
from memfit.llm.tokenizer import Tokenizer
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, Tier, available_memory, format_bytes, resolve_budget


class RequestError(ValueError):
    """A request the engine refuses (prompt too long, empty, ...); the message says what to change."""


class QueueFull(RuntimeError):
    """The waiting queue is at its configured limit (the server answers 429)."""


@dataclass
class EngineConfig:
    model: str = "memfit-tiny"  # a local Hugging Face model directory, or a bundled model's name
    dtype: str | None = None  # float32 | bfloat16 | float16; None = the checkpoint's dtype
    device: str = "auto"  # auto = cuda if available, else cpu
    kv_cache: str = "virtual"  # virtual (vAttention) | paged (vLLM-style baseline)
    kv_budget: int | float | str | None = None  # bytes ("2GiB") or a fraction of available memory
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int | None = None
    block_size: int = 16  # paged cache only
    kv_layout: str = "auto"  # virtual cache only: auto | per-layer | token-major (see kv/virtual.py)
    timeline: str | None = None  # write a per-step memory timeline (JSON lines) here
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    prepack: bool = True  # CPU: a decode-speed linear backend (cpu_linear); False = plain F.linear
    fuse: bool = True  # one matmul for q/k/v and one for gate/up (GPU, or CPU with cpu_linear onednn)
    cpu_linear: str = "auto"  # CPU linears: blocked (memfit's packed kernel) | memfit (row-major, zero-copy) |
    # onednn (packed) | auto (blocked where it runs); see _cpu_linear_backend and docs/engine.md
    cpu_kernels: bool = True  # CPU: memfit's C++ kernels for norm, RoPE, SiLU*up and decode attention

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


CPU_LINEARS = ("auto", "blocked", "memfit", "onednn")
# Without memfit's blocked kernel, "auto" picks the row-major one when no decode step can batch more rows than
# this: it beats packed oneDNN by ~1.6x at batch 1 but loses ~25% at batch 8 (benchmarks/decode_throughput.py).
AUTO_MEMFIT_MAX_SEQS = 2


def _cpu_linear_backend(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Which CPU linear backend the engine uses: "blocked" (memfit's kernel on weights packed once: the fastest
    at 1-32 rows, benchmarks/blocked_linear.py), "memfit" (memfit's row-major kernel on the checkpoint's own
    mapped weights, no copy), "onednn" (PyTorch's oneDNN on prepacked weights), or None (plain F.linear: a
    GPU, prepack=False, or none available). A memfit kernel that can't be built or run here falls back to
    oneDNN (the reason is logged); "auto" = "blocked", else as "memfit" for engines that decode at most
    AUTO_MEMFIT_MAX_SEQS sequences at once, else "onednn"."""
    if config.cpu_linear not in CPU_LINEARS:
        raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEARS)}, got {config.cpu_linear!r}")
    if device.type != "cpu" or not config.prepack:
        return None
    if config.cpu_linear in ("auto", "blocked"):
        from memfit.llm.kernels.blocked import can_use_blocked

        if can_use_blocked(dtype):
            return "blocked"
    want_memfit = config.cpu_linear == "memfit" or (config.cpu_linear == "auto" and config.max_num_seqs <= AUTO_MEMFIT_MAX_SEQS)
    if want_memfit:
        from memfit.llm.kernels.linear import can_use_row_major

        if can_use_row_major(dtype):
            return "memfit"
    from memfit.llm.models.packing import can_pack_for_cpu

    return "onednn" if can_pack_for_cpu(dtype) else None


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides) -> None:
        config = config or EngineConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown engine option {key!r}")
            setattr(config, key, value)
        self.config = config
        if config.threads is not None:
            if config.threads < 1:
                raise ValueError(f"threads must be at least 1, got {config.threads}")
            torch.set_num_threads(config.threads)
        self.device = config.resolved_device()
        path = resolve_model_path(config.model)
        self.model_path = Path(path)
        dtype = parse_dtype(config.dtype) if config.dtype else None
        self.model, self.model_config = load_model(path, dtype=dtype, device=self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.num_packed_linears = self.num_fused_layers = self.num_row_major_linears = 0
        self.cpu_linear = _cpu_linear_backend(config, self.device, self.dtype)  # "memfit" | "onednn" | None
        # Fusion copies q/k/v and gate/up into new memory. It pays on a GPU and before packing (oneDNN's or
        # memfit's blocked layout, which copy anyway: fewer, wider matmuls); with memfit's row-major kernel
        # it measured no faster (0.97-1.02x, docs/engine.md), so the weights keep their zero-copy mapping.
        if config.fuse and (self.cpu_linear in ("onednn", "blocked") or self.device.type == "cuda"):
            from memfit.llm.models.fusion import fuse_projections

            self.num_fused_layers = fuse_projections(self.model)
        self.num_blocked_linears = 0
        if self.cpu_linear == "blocked":
            from memfit.llm.kernels.blocked import use_blocked_linears

            self.num_blocked_linears = use_blocked_linears(self.model)
        if self.cpu_linear in ("blocked", "memfit"):  # "blocked" leaves a tied lm_head: row-major, no copy
            from memfit.llm.kernels.linear import use_row_major_linears

            self.num_row_major_linears = use_row_major_linears(self.model)
        elif self.cpu_linear == "onednn":
            from memfit.llm.models.packing import pack_linears_for_cpu

            self.num_packed_linears = pack_linears_for_cpu(self.model)
        self.cpu_kernels = False  # memfit's C++ kernels for the rest of a decode step (kernels/decode.py)
        if config.cpu_kernels and self.device.type == "cpu":
            from memfit.llm.kernels.decode import CpuDecodeOps

            if CpuDecodeOps.available(self.dtype):
                self.model.set_ops(CpuDecodeOps(self.dtype))
                self.cpu_kernels = True
        self.tokenizer = Tokenizer.from_dir(path)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.layout = KVLayout(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, self.dtype, self.max_model_len, self.device)
        self.kv_budget = MemoryBudget(self._budget_bytes(), Tier.DEVICE, name="kv_budget")
        layouts = {"auto": None, "per-layer": False, "token-major": True}
        if config.kv_layout not in layouts:
            raise ValueError(f"kv_layout must be one of {', '.join(layouts)}, got {config.kv_layout!r}")
        kv_opts = {"max_seqs": config.max_num_seqs, "token_major": layouts[config.kv_layout]}
        if config.kv_cache == "paged":
            kv_opts = {"block_size": config.block_size}
        self.kv = create_kv_cache(config.kv_cache, self.layout, self.kv_budget, **kv_opts)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting), self.kv
        )
        self.runner = ModelRunner(self.model, self.kv, self.device)
        if self.cpu_kernels and self.cpu_linear in ("blocked", "memfit"):  # whole decode steps in one C++ call
            from memfit.llm.kernels.stack import CpuDecodeStack

            if CpuDecodeStack.unsupported(self.model, self.kv) is None:
                self.runner.stack = CpuDecodeStack(self.model, self.kv)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._streams: dict[str, TextStream] = {}
        self._counter = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.timeline = None
        if config.timeline:
            from memfit.memory.measure import MemoryTimeline

            self.timeline = MemoryTimeline(jsonl_path=config.timeline)

    def _budget_bytes(self) -> int:
        cfg = self.config
        if cfg.kv_budget is not None:
            return resolve_budget(cfg.kv_budget, Tier.DEVICE, str(self.device))
        # Default: room for every sequence slot at full length, but never more than 40% of what is free.
        full = cfg.max_num_seqs * self.max_model_len * self.layout.bytes_per_token
        return max(1, min(full, int(0.4 * available_memory(Tier.DEVICE, str(self.device)))))

    # ---- requests --------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("give a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise RequestError("the prompt is empty: it must contain at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt_token_ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but the model's context is {self.max_model_len} "
                "tokens, and at least one token must be left to generate; shorten the prompt"
            )
        self._check_fits_budget(len(prompt_token_ids), params)
        if self.config.max_waiting is not None and len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting (limit {self.config.max_waiting})")
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(
            request_id, prompt_token_ids, params, self.eos_token_ids, self.max_model_len, session_id,
            generator=make_generator(params.seed),
        )
        if session_id is not None:
            self._adopt_session_kv(seq)
        self._seqs[request_id] = seq
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return request_id

    def _check_fits_budget(self, prompt_len: int, params: SamplingParams) -> None:
        total = min(prompt_len + params.max_tokens, self.max_model_len)
        need = self.kv.bytes_needed(total)
        if need > self.kv_budget.limit_bytes:
            from memfit.llm.fit import fit_report

            report = fit_report(self.model_config, self.dtype, context_len=total, batch=1, kv_budget=self.kv_budget.limit_bytes)
            raise MemoryBudgetExceeded(
                f"one sequence of {total} tokens needs {format_bytes(need)} of KV cache but the KV budget is "
                f"{format_bytes(self.kv_budget.limit_bytes)}; raise --kv-budget or lower max_tokens.\n{report}"
            )

    def _adopt_session_kv(self, seq: Sequence) -> None:
        """Multi-turn reuse: the session's previous turn left its KV in the cache. The new prompt usually
        repeats that turn's tokens and adds the next message, but re-rendering the chat template may
        tokenize the previous answer differently, so the KV is reused up to the longest common prefix
        and only the rest is prefilled."""
        old = self.scheduler.take_retained(seq.session_id)  # type: ignore[arg-type]
        if old is None:
            return
        cached = old.all_token_ids[: old.num_computed]
        prompt = seq.prompt_token_ids
        n = 0
        limit = min(len(cached), len(prompt) - 1)  # the last prompt token is always fed: it yields logits
        while n < limit and cached[n] == prompt[n]:
            n += 1
        if n == 0:
            self.kv.free(old.seq_id)
            return
        self.kv.truncate(old.seq_id, n)
        seq.seq_id = old.seq_id  # the KV manager knows the cache by this id
        seq.num_computed = seq.num_cached_prompt = n

    def end_session(self, session_id: str) -> None:
        self.scheduler.drop_retained(session_id)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        self._streams.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                head = self.scheduler.waiting[0]
                raise MemoryBudgetExceeded(
                    f"request {head.request_id} cannot be scheduled: the KV budget "
                    f"({format_bytes(self.kv_budget.limit_bytes)}) has no room even with nothing running"
                )
            return []
        result = self.runner.execute(sched.scheduled)
        self.num_steps += 1
        outputs = []
        for seq, token, logprobs in zip(result.sampled_seqs, result.token_ids, result.logprobs):
            seq.append_token(token, logprobs)
            self.num_generated_tokens += 1
            stream = self._streams[seq.request_id]
            stream.add(seq.output_token_ids)
            reason = "stop" if stream.stopped else seq.check_token_stop()
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq, stream))
        if self.timeline is not None:
            self._record_timeline(sched.num_tokens)
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
        return out

    def _record_timeline(self, step_tokens: int) -> None:
        st = self.kv.stats()
        self.timeline.record(  # type: ignore[union-attr]
            step=self.num_steps, step_tokens=step_tokens, kv_committed_bytes=st.committed_bytes,
            kv_used_bytes=st.used_bytes, kv_waste_bytes=st.waste_bytes, tokens_held=st.tokens_held,
            kv_budget_bytes=st.budget_bytes, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
        )

    def stats(self) -> dict:
        st = self.kv.stats()
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "kv_committed_bytes": st.committed_bytes, "kv_used_bytes": st.used_bytes,
            "kv_waste_bytes": st.waste_bytes, "kv_budget_bytes": st.budget_bytes, "tokens_held": st.tokens_held,
            "num_steps": self.num_steps, "generated_tokens": self.num_generated_tokens,
            "workspace_bytes": self.runner.workspace.nbytes,
        }

    def close(self) -> None:
        self.kv.close()
