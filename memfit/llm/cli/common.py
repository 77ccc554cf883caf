"""What the LLM commands share: sampling flags, building the engine from flags, the memory timeline."""
from __future__ import annotations

import argparse
import sys


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's generation_config)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None)


def make_engine(args: argparse.Namespace, **overrides: object):
    """An LLMEngine from the parsed engine flags (add_engine_args)."""
    from memfit.llm.engine.config import EngineConfig
    from memfit.llm.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig.from_args(args, **overrides))


def make_params(args: argparse.Namespace, engine):
    """SamplingParams from the sampling flags; omitted ones take the model's generation_config defaults."""
    from memfit.llm.engine.params import SamplingParams

    d = engine.tokenizer.generation
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature if args.temperature is not None else (d.temperature if d.temperature is not None else 1.0),
        top_p=args.top_p if args.top_p is not None else (d.top_p if d.top_p is not None else 1.0),
        top_k=args.top_k if args.top_k is not None else (d.top_k if d.top_k is not None else -1),
        seed=args.seed, stop=args.stop, logprobs=args.logprobs,
    )


def finish_timeline(engine, args: argparse.Namespace) -> None:
    if getattr(args, "timeline", None) and engine.timeline is not None:
        png = args.timeline.rsplit(".", 1)[0] + ".png"
        engine.timeline.plot(png)
        print(f"[memory timeline: {args.timeline}, {png}]", file=sys.stderr)
