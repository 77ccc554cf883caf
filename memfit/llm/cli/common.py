"""What the LLM commands share: sampling flags, building the engine from flags, the memory timeline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128, per_turn: bool = False) -> None:
    """The sampling flags; `per_turn`: chat's, where --max-tokens is per reply and logprobs are not shown."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate{' per reply' if per_turn else ''} (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's generation_config)")
    g.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches P, in (0, 1] "
                        "(default: the model's generation_config, else 1 = off)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample from the K most likely tokens; -1 or 0 = off (default: the model's generation_config, "
                        "else off)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed the sampling, so the same flags give the same text (default: unseeded)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="computed but not shown by chat (use generate)" if per_turn else
                   "after the text, print a JSON line with each generated token's log-probability and its N most "
                   "likely alternatives (0: the chosen token's only)")


def engine_config(args: argparse.Namespace, **overrides: object):
    """The EngineConfig of the parsed engine flags (add_engine_args): what generate, chat, bench (make_engine) and
    serve build their engine from. A --memory-budget of more than the machine's memory is warned about on stderr
    (warn_budget_past_memory, as `memfit fit` and `memfit train finetune` do), resolved as the engine's ledger
    resolves it; on the CPU only: on a GPU the budget is of device memory, which the machine's total says nothing
    about."""
    from memfit.errors import warn_budget_past_memory
    from memfit.llm.engine.config import EngineConfig
    from memfit.memory.budget import Tier, resolve_budget

    config = EngineConfig.from_args(args, **overrides)
    spec = getattr(args, "memory_budget", None)
    if spec is not None and config.memory_budget is not None and "memory_budget" not in overrides:
        try:
            device = config.resolved_device()
        except ValueError:  # a CUDA device that is not there: the engine refuses it, in its words
            device = None
        if device is not None and device.type == "cpu":
            warn_budget_past_memory(args, "--memory-budget", spec,
                                    resolve_budget(config.memory_budget, Tier.DEVICE, str(device)))  # ledger_bytes'
    return config


def make_engine(args: argparse.Namespace, **overrides: object):
    """An LLMEngine from the parsed engine flags (add_engine_args)."""
    from memfit.llm.engine.llm_engine import LLMEngine

    return LLMEngine(engine_config(args, **overrides))


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


def run_with_engine(args: argparse.Namespace, body: Callable[[Any, argparse.Namespace], int], plot: bool = False) -> int:
    """Check --timeline, build the engine, run `body(engine, args)` and close the engine on every path (a refusal,
    Ctrl-C): an SSD swap tier's preallocated file must not outlive the command. `plot`: as check_timeline's."""
    check_timeline(args, plot=plot)
    engine = make_engine(args)
    try:
        return body(engine, args)
    finally:
        engine.close()


def timeline_plot_path(timeline: str) -> Path:
    """Where generate and chat draw --timeline's plot: beside the JSON lines, the suffix replaced by .png
    (tl.jsonl -> tl.png, ./tl -> tl.png, v1.2/timeline -> v1.2/timeline.png)."""
    return Path(timeline).with_suffix(".png")


def check_timeline(args: argparse.Namespace, plot: bool = False) -> None:
    """Refuse a --timeline path that cannot be written before the model is loaded and anything generated: a
    folder, a path under a file, an unwritable place, or a .png name, whose plot would overwrite the JSON lines
    just written (ValueError naming --timeline). `plot`: the command also draws timeline_plot_path."""
    from memfit.errors import output_path

    timeline = getattr(args, "timeline", None)
    if not timeline:
        return
    if Path(timeline).suffix.lower() == ".png":
        raise ValueError(f"--timeline {timeline}: give the JSON-lines file (such as "
                         f"{Path(timeline).with_suffix('.jsonl')}); generate and chat draw the plot beside it, as a "
                         ".png of the same name")
    output_path(timeline, "--timeline")
    if plot:
        output_path(timeline_plot_path(timeline), f"--timeline {timeline} (its plot)")


def finish_timeline(engine, args: argparse.Namespace) -> None:
    if getattr(args, "timeline", None) and engine.timeline is not None:
        png = timeline_plot_path(args.timeline)
        engine.timeline.plot(png)
        print(f"[memory timeline: {args.timeline}, {png}]", file=sys.stderr)
