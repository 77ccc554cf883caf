"""LLM inference and serving: `from memfit.llm import LLM, SamplingParams`.

Rooms: engine/ (engine, scheduler, requests, step data, sampling, API), models/ (model code, loader,
tokenizer), kernels/ (attention and compute backends), kv/ (KV-cache managers), server/ (the OpenAI-compatible
HTTP API), cli/ (the commands). Names are imported lazily so that `memfit --help` (which imports
memfit.llm.cli) does not load torch.
"""
from __future__ import annotations

from memfit.lazy import lazy_exports

_EXPORTS = {
    "LLM": "memfit.llm.engine.api",
    "LLMEngine": "memfit.llm.engine.llm_engine",
    "EngineConfig": "memfit.llm.engine.config",
    "SamplingParams": "memfit.llm.engine.params",
    "RequestOutput": "memfit.llm.engine.outputs",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
