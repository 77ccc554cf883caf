"""Commands of the LLM family: generate, chat (generate.py), fit (fit.py), bench (bench.py), serve (serve.py).

Each module registers its own parsers; they share the engine flags (memfit.llm.engine.config.add_engine_args)
and the helpers in common.py, and import nothing from each other. Registration is cheap: torch, FastAPI and
uvicorn load inside the commands, so `memfit --help` is instant.
"""
from __future__ import annotations


def register(sub) -> None:
    from memfit.llm.cli import bench, fit, generate, serve

    generate.register(sub)
    fit.register(sub)
    bench.register(sub)
    serve.register(sub)
