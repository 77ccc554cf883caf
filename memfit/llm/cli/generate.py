"""`memfit generate` (one prompt, streamed) and `memfit chat` (multi-turn, the conversation's KV kept)."""
from __future__ import annotations

import json
import sys

from memfit.errors import USER_ERRORS, guard
from memfit.llm.cli.common import add_sampling_args, finish_timeline, make_params, run_with_engine
from memfit.llm.engine.config import add_engine_args


def _stream(engine, rid: str):
    """Step the engine until it is idle, writing request `rid`'s text to stdout as it becomes final;
    returns its last RequestOutput."""
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
                final = out
    sys.stdout.write("\n")
    if final is None:
        raise RuntimeError(f"the engine went idle without an output for request {rid}")
    return final


def cmd_generate(args) -> int:
    return run_with_engine(args, _generate, plot=True)


def _generate(engine, args) -> int:
    params = make_params(args, engine)
    rid = engine.add_request(args.prompt, params)
    if not args.no_echo:
        sys.stdout.write(args.prompt)
    final = _stream(engine, rid)
    if args.logprobs is not None and final.logprobs:
        print(json.dumps([{"token_id": lp.token_id, "logprob": lp.logprob, "top": {str(k): v for k, v in lp.top.items()}}
                          for lp in final.logprobs]))
    print(f"[{len(final.token_ids)} tokens, finish_reason={final.finish_reason}, "
          f"kv committed peak {engine.kv_budget.peak_bytes} B]", file=sys.stderr)
    finish_timeline(engine, args)
    return 0


def cmd_chat(args) -> int:
    """Interactive multi-turn chat. The conversation's KV stays in the cache between turns (a session),
    so each turn only prefills the tokens it adds."""
    return run_with_engine(args, _chat, plot=True)


def _chat(engine, args) -> int:
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
        try:  # a turn the engine refuses (the conversation outgrew the context, undecodable bytes) is not sent
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
            rid = engine.add_request(prompt_token_ids=ids, params=params, session_id=session)
        except USER_ERRORS as exc:
            messages.pop()  # the conversation stays as it was: nothing is lost, the next line goes on from it
            print(f"memfit chat: error: {exc}; that message was not sent (/reset starts a new conversation)",
                  file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        final = _stream(engine, rid)
        print(f"[prefilled {len(ids) - final.num_cached_tokens} new tokens, reused {final.num_cached_tokens} from the cache]",
              file=sys.stderr)
        messages.append({"role": "assistant", "content": final.text})
    finish_timeline(engine, args)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the completion")
    add_engine_args(p, max_num_seqs=1)  # one prompt: one sequence, so "auto" picks the batch-1 kernel
    add_sampling_args(p)
    p.set_defaults(func=guard(cmd_generate))

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    p.add_argument("--system", default=None, help="system message")
    add_engine_args(p, max_num_seqs=1)  # one conversation: its turns reuse one sequence's KV
    add_sampling_args(p, max_tokens=256, per_turn=True)
    p.set_defaults(func=guard(cmd_chat))
