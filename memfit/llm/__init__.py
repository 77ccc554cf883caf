"""LLM inference and serving: `from memfit.llm import LLM, SamplingParams`.

Names are imported lazily so that `memfit --help` (which imports memfit.llm.cli) does not load torch.
"""
from __future__ import annotations

_EXPORTS = {
    "LLM": "memfit.llm.api",
    "LLMEngine": "memfit.llm.engine",
    "EngineConfig": "memfit.llm.engine",
    "SamplingParams": "memfit.llm.sampling",
    "RequestOutput": "memfit.llm.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memfit.llm' has no attribute {name!r}")
