"""The engine room: what decides and what runs a step.

    config.py      EngineConfig and its command-line flags (add_engine_args, EngineConfig.from_args)
    llm_engine.py  LLMEngine: builds the parts, step() = schedule -> run -> post-process
    ledger.py      the memory ledger: its size, the fixed parts' reservation, the KV share
    swap_tiers.py  the swap tiers: building them, their stats and timeline rows
    sessions.py    a session's next turn takes over its previous turn's KV
    api.py         LLM: offline batch generation (vLLM's convention)
    protocol.py    EngineClient / ModelInfo: what a server may ask of an engine
    scheduler.py   who runs next (no tensors); preemption.py: its memory pressure, preemption and swaps
    request.py     sequence state; params.py: SamplingParams; errors.py: RequestError, QueueFull (no torch)
    step.py        the step's data: SchedulerOutput -> runner -> StepResult
    runner.py      the only owner of device memory: batch tensors, the model, sampling
    sampling.py    logits -> tokens; outputs.py, textstream.py: what callers get back
    fit.py         the memory model behind `memfit fit`

Names are imported lazily, so importing a torch-free module here (params, request, step, config) does not
load torch.
"""
from __future__ import annotations

from memfit.lazy import lazy_exports

_EXPORTS = {
    "LLM": "memfit.llm.engine.api",
    "LLMEngine": "memfit.llm.engine.llm_engine",
    "RequestError": "memfit.llm.engine.errors",
    "QueueFull": "memfit.llm.engine.errors",
    "EngineConfig": "memfit.llm.engine.config",
    "add_engine_args": "memfit.llm.engine.config",
    "EngineClient": "memfit.llm.engine.protocol",
    "ModelInfo": "memfit.llm.engine.protocol",
    "SamplingParams": "memfit.llm.engine.params",
    "RequestOutput": "memfit.llm.engine.outputs",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
