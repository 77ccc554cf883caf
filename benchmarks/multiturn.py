"""The multi-turn workload of benchmarks/preemption.py (`--workload multiturn`): conversations whose every turn
resends the history, so a swap tier that keeps a conversation's KV between turns (cross-turn reuse) has
something to reuse.

Conversations (seeded), arriving as a Poisson process at `--rate` per second:
- half are MT-Bench's two-turn questions (/work/shared/data/mt_bench/question.jsonl, Apache-2.0, tokenized by
  the model's tokenizer; if the file is absent, random tokens of the same lengths as the synthetic ones). A
  random-initialised shape (`--model 0.1b|0.5b`) has a placeholder tokenizer that would make each message one
  token: there a message is random tokens as many as the bundled memfit-tiny tokenizer makes of it;
- half are synthetic ShareGPT-like conversations of 3-8 turns (uniform), each user message log-normal in length
  (median `--prompt-median` / 4, sigma 0.6, clipped to 8..128 tokens) of random tokens.
Every turn's answer is `max_tokens` uniform in 16..`--output-max` (greedy, ignore_eos). Turn k's prompt is the
conversation so far (turn 1's prompt, its answer, ..., message k); it is sent `think` seconds (exponential, mean
`--think`) after turn k-1 finished, with the conversation's `session_id`, so the engine may keep its KV. A
conversation's first prompt is prefixed by a random "system prompt" of log-normal length (median
`--prompt-median`, clipped to 16..`--prompt-max`), so histories are long; a conversation ends before its history
would pass `--history-max` tokens. Priorities 0..3 per conversation; at every engine step each live
request changes priority with probability `--change` (as in the single-turn workload).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

MT_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mt_bench" / "question.jsonl"
PLACEHOLDER_VOCAB = 256  # below this a tokenizer is a stand-in (benchmarks/decode_setup.py writes a 1-word one)


def message_tokens(tokenizer, vocab: int, rng: random.Random):
    """text -> token ids for an MT-Bench message: the model's own tokenizer, or, where that is a placeholder
    (a random-initialised shape), random ids in the model's vocabulary, as many as memfit-tiny's tokenizer
    makes of the text, so the workload's lengths match the bundled model's."""
    if tokenizer.vocab_size >= PLACEHOLDER_VOCAB:
        return tokenizer.encode
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.tokenizer import Tokenizer

    real = Tokenizer.from_dir(resolve_model_path("memfit-tiny"))
    return lambda text: [rng.randrange(3, vocab) for _ in real.encode(text)]


def conversations(a, tokenizer, vocab: int) -> list[dict]:
    rng = random.Random(a.seed)
    mt = []
    if MT_BENCH.exists():
        mt = [json.loads(line)["turns"] for line in MT_BENCH.read_text().splitlines() if line.strip()]
    out, t = [], 0.0

    def rand_tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    encode = message_tokens(tokenizer, vocab, rng) if mt else None

    def msg_len() -> int:
        return int(min(128, max(8, rng.lognormvariate(0, 0.6) * a.prompt_median / 4)))

    for i in range(a.requests):
        t += rng.expovariate(a.rate)
        system = rand_tokens(int(min(a.prompt_max, max(16, rng.lognormvariate(0, 0.6) * a.prompt_median))))
        if i % 2 == 0 and mt:
            turns = [encode(text) for text in mt[(i // 2) % len(mt)]]
            kind = "mt-bench"
        else:
            turns = [rand_tokens(msg_len()) for _ in range(rng.randint(3, 8))]
            kind = "sharegpt-like"
        turns[0] = system + turns[0]
        max_tokens = [rng.randint(16, a.output_max) for _ in turns]
        total, keep = 0, 0
        for msg, n in zip(turns, max_tokens):  # a conversation ends before its history passes --history-max
            if total + len(msg) + n > a.history_max:
                break
            total, keep = total + len(msg) + n, keep + 1
        turns, max_tokens = turns[: max(1, keep)], max_tokens[: max(1, keep)]
        out.append({"arrival": t, "kind": kind, "turns": turns, "priority": rng.randrange(4), "max_tokens": max_tokens})
    return out


def replay(a, engine) -> dict:
    """Run the conversations against `engine` in wall-clock time; per-turn TTFT and per-token TBT."""
    from memfit.llm.engine.params import SamplingParams

    convs = conversations(a, engine.tokenizer, engine.model_config.vocab_size)
    change = random.Random(a.seed + 2)
    ready = [(c["arrival"], i) for i, c in enumerate(convs)]  # (when the next turn is sent, conversation)
    history = [[] for _ in convs]
    turn_of = [0] * len(convs)
    times: dict[str, list[float]] = {}
    sent: dict[str, float] = {}
    live: dict[str, int] = {}
    think = random.Random(a.seed + 3)
    t0 = time.perf_counter()
    while ready or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        for when, i in sorted(ready):
            if when > now:
                continue
            ready.remove((when, i))
            c, k = convs[i], turn_of[i]
            history[i] = history[i] + c["turns"][k]
            rid = f"c{i}t{k}"
            engine.add_request(prompt_token_ids=history[i], request_id=rid, priority=c["priority"], session_id=f"c{i}",
                               params=SamplingParams(max_tokens=c["max_tokens"][k], temperature=0, ignore_eos=True))
            sent[rid], times[rid], live[rid] = t0 + when, [], i
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(w for w, _ in ready) - (time.perf_counter() - t0)) if ready else 0)
            continue
        for rid in sorted(live):
            if change.random() < a.change:
                engine.set_priority(rid, change.randrange(4))
        outs = engine.step()
        stamp = time.perf_counter()
        for out in outs:
            ids = out.outputs[0].token_ids
            times[out.request_id] += [stamp] * (len(ids) - len(times[out.request_id]))
            if out.finished:
                i = live.pop(out.request_id)
                history[i] = history[i] + list(ids)
                turn_of[i] += 1
                if turn_of[i] < len(convs[i]["turns"]):
                    ready.append((stamp - t0 + think.expovariate(1 / a.think), i))
                else:
                    engine.end_session(f"c{i}")
    makespan = time.perf_counter() - t0
    return {"times": times, "sent": sent, "makespan": makespan,
            "turns": sum(len(c["turns"]) for c in convs),
            "conversations": {k: sum(c["kind"] == k for c in convs) for k in ("mt-bench", "sharegpt-like")}}
