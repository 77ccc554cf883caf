"""LLM inference and serving: `from memfit.llm import LLM, SamplingParams`.

Rooms: engine/ (engine, scheduler, requests, step data, sampling, API), models/ (model code, loader,
tokenizer), kernels/ (attention and compute backends), kv/ (KV-cache managers), server/ (the OpenAI-compatible
HTTP API), cli/ (the commands). Names are imported lazily so that `memfit --help` (which imports
memfit.llm.cli) does not load torch.
"""
from __future__ import annotations

_EXPORTS = {
    "LLM": "memfit.llm.engine.api",
    "LLMEngine": "memfit.llm.engine.llm_engine",
    "EngineConfig": "memfit.llm.engine.config",
    "SamplingParams": "memfit.llm.engine.params",
    "RequestOutput": "memfit.llm.engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memfit.llm' has no attribute {name!r}")
