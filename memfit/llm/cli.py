"""Commands of the LLM family: generate, chat, fit, bench (and serve, registered by memfit.llm.server)."""
from __future__ import annotations

import argparse
import json
import sys


def _engine_args(p: argparse.ArgumentParser, max_num_seqs: int = 64) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="memfit-tiny", help="local Hugging Face model dir, or a bundled model name (default: memfit-tiny)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--kv-cache", default="virtual", choices=["virtual", "paged"])
    g.add_argument("--kv-layout", default="auto", choices=["auto", "per-layer", "token-major"],
                   help="virtual cache page layout (auto: token-major on CUDA's 2 MiB pages, per-layer on CPU)")
    g.add_argument("--kv-budget", default=None, help="KV memory: bytes ('512MiB') or a fraction of free memory ('0.3')")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs,
                   help=f"sequences decoded at once (default {max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core; 1 is best for tiny models or a busy machine)")
    g.add_argument("--timeline", default=None, help="write the per-step memory timeline here (JSON lines) and a PNG beside it")
    g.add_argument("--cpu-linear", default="auto", choices=["auto", "blocked", "memfit", "onednn"],
                   help="CPU matmuls: memfit's kernel on packed weights (blocked), its row-major kernel on the mapped checkpoint (memfit), oneDNN, or auto = blocked where it runs (docs/engine.md)")
    g.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                   help="CPU: run norms, RoPE, SiLU and attention as PyTorch ops instead of memfit's C++ kernels")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's generation_config)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None)


def _budget(value: str | None):
    if value is None:
        return None
    try:
        f = float(value)
        return f if 0 < f <= 1 else value
    except ValueError:
        return value


def make_engine(args):
    from memfit.llm.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, kv_cache=args.kv_cache,
        kv_budget=_budget(args.kv_budget), max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, timeline=args.timeline, threads=args.threads,
        kv_layout=args.kv_layout, cpu_linear=args.cpu_linear, cpu_kernels=args.cpu_kernels,
    ))


def make_params(args, engine):
    from memfit.llm.sampling import SamplingParams

    d = engine.tokenizer.generation
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature if args.temperature is not None else (d.temperature if d.temperature is not None else 1.0),
        top_p=args.top_p if args.top_p is not None else (d.top_p if d.top_p is not None else 1.0),
        top_k=args.top_k if args.top_k is not None else (d.top_k if d.top_k is not None else -1),
        seed=args.seed, stop=args.stop, logprobs=args.logprobs,
    )


def _finish_timeline(engine, args) -> None:
    if args.timeline and engine.timeline is not None:
        png = args.timeline.rsplit(".", 1)[0] + ".png"
        engine.timeline.plot(png)
        print(f"[memory timeline: {args.timeline}, {png}]", file=sys.stderr)


def cmd_generate(args) -> int:
    engine = make_engine(args)
    params = make_params(args, engine)
    rid = engine.add_request(args.prompt, params)
    if not args.no_echo:
        sys.stdout.write(args.prompt)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
                final = out
    sys.stdout.write("\n")
    if args.logprobs is not None and final is not None and final.logprobs:
        print(json.dumps([{"token_id": lp.token_id, "logprob": lp.logprob, "top": {str(k): v for k, v in lp.top.items()}}
                          for lp in final.logprobs]))
    print(f"[{len(final.token_ids) if final else 0} tokens, finish_reason={final.finish_reason if final else None}, "
          f"kv committed peak {engine.kv_budget.peak_bytes} B]", file=sys.stderr)
    _finish_timeline(engine, args)
    return 0


def cmd_chat(args) -> int:
    """Interactive multi-turn chat. The conversation's KV stays in the cache between turns (a session),
    so each turn only prefills the tokens it adds."""
    engine = make_engine(args)
    params = make_params(args, engine)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    session = "chat"
    interactive = sys.stdin.isatty()
    print("memfit chat: type a message, /reset to start over, /quit or Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            engine.end_session(session)
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        rid = engine.add_request(prompt_token_ids=ids, params=params, session_id=session)
        sys.stdout.write("assistant> ")
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    sys.stdout.write(out.outputs[0].delta_text)
                    sys.stdout.flush()
                    final = out
        sys.stdout.write("\n")
        assert final is not None
        print(f"[prefilled {len(ids) - final.num_cached_tokens} new tokens, reused {final.num_cached_tokens} from the cache]",
              file=sys.stderr)
        messages.append({"role": "assistant", "content": final.text})
    _finish_timeline(engine, args)
    return 0


def cmd_fit(args) -> int:
    from memfit.llm.fit import predict, fit_report
    from memfit.llm.loader import resolve_model_path
    from memfit.llm.models.config import ModelConfig, parse_dtype
    from memfit.memory.budget import parse_bytes

    cfg = ModelConfig.from_dir(resolve_model_path(args.model))
    dtype = parse_dtype(args.dtype) if args.dtype else parse_dtype(cfg.torch_dtype)
    kv_budget = parse_bytes(args.kv_budget) if args.kv_budget else None
    limit = parse_bytes(args.memory) if args.memory else None
    b = predict(cfg, dtype, args.context, args.batch, args.chunk, kv_budget, limit)
    if args.json:
        print(json.dumps({"model": args.model, "dtype": str(dtype).replace("torch.", ""), "context": args.context,
                          "batch": args.batch, **b.to_dict()}))
    else:
        print(fit_report(cfg, dtype, args.context, args.batch, kv_budget, limit, args.chunk))
    return 0 if b.fits else 3


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the completion")
    _engine_args(p, max_num_seqs=1)  # one prompt: one sequence, so "auto" picks the batch-1 kernel
    _sampling_args(p)
    p.set_defaults(func=_guard(cmd_generate))

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    p.add_argument("--system", default=None, help="system message")
    _engine_args(p, max_num_seqs=1)  # one conversation: its turns reuse one sequence's KV
    _sampling_args(p, max_tokens=256)
    p.set_defaults(func=_guard(cmd_chat))

    p = sub.add_parser("fit", help="predict the memory breakdown for a model, context and batch")
    p.add_argument("--model", default="memfit-tiny")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence (prompt + output)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (max batched tokens per step)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-budget", default=None, help="bytes, e.g. 512MiB")
    p.add_argument("--memory", default=None, help="total memory limit to check against, e.g. 8GiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_fit))

    from memfit.llm import bench_cli
    from memfit.llm.server import cli as server_cli

    bench_cli.register(sub, _engine_args, _guard)
    server_cli.register(sub)


def _guard(func):
    """Turn the errors a user can fix into a message and exit code 2, without a traceback."""

    def run(args) -> int:
        from memfit.errors import USER_ERRORS

        try:
            return func(args)
        except USER_ERRORS as exc:
            print(f"memfit {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130

    return run
