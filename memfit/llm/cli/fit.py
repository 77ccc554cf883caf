"""`memfit fit`: the predicted memory breakdown of a model, context and batch (memfit.llm.engine.fit)."""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from memfit.errors import guard, warn_budget_past_memory

if TYPE_CHECKING:
    import torch

    from memfit.llm.engine.fit import FitBreakdown


KEEP_SPEEDUP = 0.95  # --keep-speedup's default


def _check_weights(path, option: str, measure: bool) -> None:
    from memfit.llm.models import loader

    if measure or loader.has_weight_files(path):
        loader.check_weight_files(path)
    else:
        print(f"memfit fit: warning: {option} {path} has no weight files yet; predicting from its config.json alone "
              "(generate, chat, bench and serve need its *.safetensors)", file=sys.stderr)


def cmd_fit(args) -> int:
    from memfit.llm.engine.fit import predict_for_engine
    from memfit.llm.models.config import ModelConfig, parse_dtype
    from memfit.llm.models import loader
    from memfit.memory.budget import Tier, format_bytes, resolve_budget

    g = args.num_speculative_tokens
    if g is not None and g < 1:  # 0 was read as the default 4; the engine commands refuse it
        raise ValueError(f"--num-speculative-tokens must be at least 1, got {g}")
    if args.speculative_model is None:  # the speculation options mean nothing without a draft: say so
        given = [flag for flag, value in (("--num-speculative-tokens", g),
                                          ("--acceptance", args.acceptance), ("--draft-cost", args.draft_cost),
                                          ("--verify-cost", args.verify_cost),
                                          ("--keep-speedup", args.keep_speedup))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} needs --speculative-model (the draft whose speed-up it is about)")
    path = loader.resolve_model_path(args.model)
    # The weights are never read here, but a directory the engine would refuse (pickle only, truncated
    # safetensors) must not get a prediction: the same checks as the loader, from the files' headers. A directory
    # with no weight file at all is sized from config.json alone, with a warning: "will it fit?" is asked before
    # the weights are downloaded (--measure, which runs the model, needs them).
    _check_weights(path, "--model", args.measure)
    draft = args.speculative_model
    if draft is not None and draft != "self" and not draft.startswith("self:"):  # self[:N] shares the target's
        _check_weights(loader.resolve_model_path(draft), "--speculative-model", args.measure)
    positions = ModelConfig.from_dir(path).max_position_embeddings
    if args.context > positions:  # the engine caps max_model_len here: no sequence this long can run
        print(f"memfit fit: warning: --context {args.context} is past the model's {positions} positions; the engine "
              f"caps a sequence at {positions} tokens, so this prediction is for a sequence it will not run",
              file=sys.stderr)
    # Budgets take the same forms as everywhere else: bytes, or a fraction of the memory available now.
    kv_budget = resolve_budget(args.kv_budget, Tier.DEVICE, "cpu") if args.kv_budget else None
    limit = resolve_budget(args.memory_budget, Tier.DEVICE, "cpu") if args.memory_budget else None
    if limit is not None:
        warn_budget_past_memory(args, "--memory-budget", args.memory_budget, limit)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    args.chunk = _chunk(args)
    b = predict_for_engine(path, args.context, args.batch, args.chunk, dtype=dtype, cpu_linear=args.cpu_linear,
                           prepack=args.prepack, cpu_kernels=args.cpu_kernels, measure_runtime=args.runtime,
                           kv_budget=kv_budget, memory_limit=limit, speculative_model=args.speculative_model,
                           num_speculative_tokens=args.num_speculative_tokens,
                           tensor_parallel_size=args.tensor_parallel_size, speculative_tree=args.tree)
    dtype = dtype or parse_dtype(ModelConfig.from_dir(path).torch_dtype)
    # The bound's speed-up model is the chain's (engine/spec_budget.py): with --tree only the footprint is printed.
    chain = args.speculative_model is not None and args.tree is None
    bound = _spec_bound(args, path, kv_budget, limit, dtype) if chain else None
    measured = _measure(args, str(dtype).removeprefix("torch.")) if args.measure else None
    if args.json:
        print(json.dumps({"model": args.model, "dtype": str(dtype).replace("torch.", ""), "context": args.context,
                          "batch": args.batch, "chunk": args.chunk, **b.to_dict(), **({"measured": measured} if measured else {}),
                          **({"speculative_bound": bound.to_dict()} if bound else {})}))
    else:
        print(format_report(b, dtype, args.context, args.batch))
        if bound is not None:
            print(_format_bound(bound))
        if measured:
            print(f"  measured     {format_bytes(measured['measured_peak_bytes']):>12}   peak RSS added "
                  f"({measured['measured_peak_bytes'] / b.total_bytes:.3f} of the prediction); "
                  f"{format_bytes(measured['measured_end_bytes'])} at the end")
    return 0 if b.fits else 3


def _chunk(args) -> int:
    """The step the predicted engine forms: --chunk if given; with --offline the offline `LLM` API's CPU step (what
    `LLM(max_num_seqs=batch, max_model_len=context)` steps without max_num_batched_tokens or a memory budget:
    engine/api.py; fit's engine serves `batch` sequences, as everywhere in fit), else the server's 512."""
    from memfit.llm.engine.api import offline_step_tokens
    from memfit.llm.engine.config import EngineConfig

    default = EngineConfig().max_num_batched_tokens
    if args.chunk is not None:
        return args.chunk
    if args.offline and args.memory_budget is None:
        return offline_step_tokens(default, args.batch, args.context)
    return default


def _spec_bound(args, path, kv_budget, limit, dtype):
    """The smallest budget keeping --keep-speedup of the predicted speed-up (engine/spec_budget.py), from the
    acceptance and pass costs given, or measured with the pair on this machine."""
    from memfit.llm.engine.config import DEFAULT_SPECULATIVE_TOKENS
    from memfit.llm.engine.fit import predict_for_engine
    from memfit.llm.engine.spec_budget import measure, smallest_budget

    gamma = DEFAULT_SPECULATIVE_TOKENS if args.num_speculative_tokens is None else args.num_speculative_tokens
    given = (args.acceptance, args.draft_cost, args.verify_cost)
    if None in given:
        got = measure(str(args.model), args.speculative_model, gamma, str(dtype).removeprefix("torch."))
        given = tuple(m if g is None else g for g, m in zip(given, got))

    def total_at(g: int) -> int:
        return predict_for_engine(path, args.context, args.batch, args.chunk, dtype=dtype, cpu_linear=args.cpu_linear,
                                  prepack=args.prepack, cpu_kernels=args.cpu_kernels, measure_runtime=args.runtime,
                                  kv_budget=kv_budget, memory_limit=limit,
                                  speculative_model=args.speculative_model if g else None,
                                  num_speculative_tokens=g or None,
                                  tensor_parallel_size=args.tensor_parallel_size).total_bytes

    keep = KEEP_SPEEDUP if args.keep_speedup is None else args.keep_speedup
    return smallest_budget(*given, gamma, total_at, keep)


def _format_bound(r) -> str:
    from memfit.memory.budget import format_bytes

    head = (f"speculation (acceptance {r.alpha:.2f} per token; a draft pass costs {r.draft_cost:.2f} and a verification "
            f"{r.verify_cost:.2f} plain decode steps):")
    if r.best_gamma == 0:
        return (f"{head}\n  no number of draft tokens beats plain decoding here (predicted); the budget without "
                f"speculation: {format_bytes(r.budget_bytes)}")
    return (f"{head}\n  fastest g {r.best_gamma}: {r.best_speedup:.2f}x plain (predicted); the smallest budget "
            f"keeping {r.keep:.0%} of that: {format_bytes(r.budget_bytes)} (g {r.gamma}, {r.speedup:.2f}x)")


def _measure(args, dtype: str) -> dict:
    """Run the workload (two rounds of `batch` requests of `context` tokens) in a fresh process and return what
    it measured (memfit.llm.engine.fitcheck)."""
    import subprocess

    cmd = [sys.executable, "-m", "memfit.llm.engine.fitcheck", str(args.model), "--batch", str(args.batch), "--context",
           str(args.context), "--chunk", str(args.chunk), "--dtype", dtype, "--cpu-linear", args.cpu_linear]
    cmd += ([] if args.prepack else ["--no-prepack"]) + ([] if args.cpu_kernels else ["--no-cpu-kernels"])
    if args.speculative_model is not None:
        from memfit.llm.engine.config import DEFAULT_SPECULATIVE_TOKENS

        gamma = DEFAULT_SPECULATIVE_TOKENS if args.num_speculative_tokens is None else args.num_speculative_tokens
        cmd += ["--speculative-model", args.speculative_model]
        cmd += ["--speculative-tree", args.tree] if args.tree else ["--num-speculative-tokens", str(gamma)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 2:  # fitcheck refused the input with a user error, as {"error": message}: say it once
        try:
            message = json.loads(done.stdout.strip().splitlines()[-1])["error"]
        except (IndexError, ValueError, KeyError, TypeError):
            message = None
        if isinstance(message, str):
            raise ValueError(f"--measure: the measuring run refused the workload: {message}")
    if done.returncode != 0:
        raise RuntimeError(f"the measuring run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def register(sub) -> None:
    from memfit.llm.engine.config import CPU_LINEARS

    p = sub.add_parser("fit", help="predict the memory breakdown for a model, context and batch")
    p.add_argument("--model", default="memfit-tiny", help="model directory or bundled name (default memfit-tiny)")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence (prompt + output)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk (max batched tokens per step; default 512, the engine's and the server's)")
    p.add_argument("--offline", action="store_true",
                   help="predict the offline LLM(max_num_seqs=BATCH, max_model_len=CONTEXT) API, which steps up to "
                        "2048 tokens on a CPU (at most batch x context) unless given a memory budget (--chunk wins)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' and KV's dtype (default: the model's torch_dtype in config.json)")
    p.add_argument("--cpu-linear", default="auto", choices=list(CPU_LINEARS), help="the engine's CPU linear backend")
    p.add_argument("--no-prepack", dest="prepack", action="store_false", help="plain F.linear (EngineConfig(prepack=False))")
    p.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                   help="PyTorch's ops instead of memfit's C++ kernels (EngineConfig(cpu_kernels=False))")
    p.add_argument("--no-runtime", dest="runtime", action="store_false",
                   help="do not measure the runtime's share (measured once per machine in a subprocess, then cached)")
    p.add_argument("--kv-budget", default=None, help="bytes ('512MiB') or a fraction of the available memory ('0.3', '30%%')")
    p.add_argument("--memory-budget", "--memory", dest="memory_budget", default=None,
                   help="total memory to check against: bytes ('8GiB') or a fraction ('0.5')")
    p.add_argument("--measure", action="store_true",
                   help="also run the workload (two rounds of the batch) in a fresh process and report the RSS it added")
    p.add_argument("--speculative-model", default=None,
                   help="add speculative decoding's draft (bundled name, directory or self[:N]): its weights, KV, step "
                        "and the speculation buffers")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="the largest number of tokens the draft may propose (default 4)")
    p.add_argument("--tree", "--speculative-tree", dest="tree", default=None, metavar="W,D",
                   help="speculation with a token tree (the engine's --speculative-tree): count its buffers (W x D + 1 "
                        "verification rows of logits, the masks) and W x D lookahead tokens of the target's KV")
    p.add_argument("--keep-speedup", type=float, default=None,  # None: not given (refused without a draft)
                   help=f"speculation: print the smallest budget keeping this share of the predicted speed-up "
                        f"(default {KEEP_SPEEDUP})")
    p.add_argument("--acceptance", type=float, default=None,
                   help="speculation: the draft's per-token acceptance rate (default: measured with the pair here)")
    p.add_argument("--draft-cost", type=float, default=None,
                   help="speculation: a draft pass's time in plain decode steps (default: measured with the pair here)")
    p.add_argument("--verify-cost", type=float, default=None,
                   help="speculation: a verification pass's time in plain decode steps (default: measured here)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="print one rank's breakdown when the model is split over this many processes (weights/N, KV/N, "
                        "the replicated parts)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the breakdown) on stdout")
    p.set_defaults(func=guard(cmd_fit))


def format_report(b: FitBreakdown, dtype: torch.dtype, context_len: int, batch: int) -> str:
    """`memfit fit`'s table: a line per part of the prediction, the parts that are zero left out."""
    from memfit.memory.budget import format_bytes

    n = b.tensor_parallel_size
    lines = [
        f"memory needed for batch {batch} x {context_len} tokens ({str(dtype).replace('torch.', '')}"
        + (f", {b.cpu_linear} linears" if b.cpu_linear else "") + (f"), per rank of {n}:" if n > 1 else "):"),
        f"  weights      {format_bytes(b.weights_bytes):>12}" + (
            f"   (1/{n} of the heads, MLP and vocabulary; {format_bytes(b.replicated_weights_bytes)} replicated: norms"
            ", row-parallel biases)" if n > 1 else ""),
        f"  KV cache     {format_bytes(b.kv_bytes):>12}" + (f"   (1/{n} of the KV heads)" if n > 1 else "") + (
            f"   (budget {format_bytes(b.kv_budget_bytes)}: {'fits' if b.kv_fits else 'does NOT fit'})"
            if b.kv_budget_bytes else ""),
        f"  activations  {format_bytes(b.activation_bytes):>12}",
        f"  workspace    {format_bytes(b.workspace_bytes):>12}",
        f"  oneDNN kernels {format_bytes(b.shape_cache_bytes):>10}   (one per matrix and row bucket, kept by the "
        "process)" if b.shape_cache_bytes else "",
        f"  tokenizer    {format_bytes(b.tokenizer_bytes):>12}" + ("   (on every rank)" if n > 1 else ""),
        f"  runtime      {format_bytes(b.runtime_bytes):>12}   (measured once on this machine; 0 = not measured"
        + (f"; the most of fresh runs that held {format_bytes(b.runtime_low_bytes)} at the least"
           if b.runtime_low_bytes else "") + ("; on every rank)" if n > 1 else ")"),
        f"  speculative  {format_bytes(b.speculative_bytes):>12}   (draft weights {format_bytes(b.draft_weights_bytes)}, "
        f"draft KV {format_bytes(b.draft_kv_bytes)}, draft step {format_bytes(b.draft_step_bytes)}, buffers "
        f"{format_bytes(b.speculation_bytes)})" if b.speculative_bytes else "",
        f"  total        {format_bytes(b.total_bytes):>12}" + (
            f"   (limit {format_bytes(b.memory_limit_bytes)}: {'fits' if b.fits else 'does NOT fit'})"
            if b.memory_limit_bytes else ""),
        f"  all {n} ranks {format_bytes(b.all_ranks_bytes):>12}" + ("   (the draft on rank 0 only)" if b.speculative_bytes else "")
        if n > 1 else "",
        f"  (importing torch and memfit: {format_bytes(b.runtime_baseline_bytes)}, not in the total)"
        if b.runtime_baseline_bytes else "",
    ]
    return "\n".join(line for line in lines if line)
