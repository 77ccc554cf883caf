"""Speculative decoding on MT-Bench two-turn conversations: plain decoding against speculative decoding with
multi-turn KV reuse (both models keep a session's KV between its turns) and without it (every turn re-prefills
the whole conversation in both models, as the Medusa/EAGLE reference loops do).

    python -m benchmarks.speculative_mtbench --threads 1 --conversations 16 --reps 5 --max-tokens 96 --gammas 1,2 \
        --out benchmarks/results/speculative_mtbench.json

Each conversation is one MT-Bench question (memfit/data/mt_bench/question.jsonl, Apache-2.0, from lm-sys/FastChat),
run at batch 1 through memfit-tiny's chat template: turn 1, then turn 2 with turn 1's answer in the history. The
variants run conversation by conversation, alternated round by round and timed by the process's CPU time (median
of the rounds): throughput (generated tokens over the whole workload's time, prefills included), per-token
acceptance, tokens per target pass, the prompt tokens of a round and how many of them reused an earlier turn's
KV instead of being prefilled (the draft adopts the same prefix), and whether the generated tokens equal plain
decoding's (greedy, float32).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import emit, header, interleave, pin_threads

QUESTIONS = Path(__file__).resolve().parent.parent / "memfit" / "data" / "mt_bench" / "question.jsonl"


def conversation(llm, question: dict, sp, session: str | None, counts: dict) -> list[list[int]]:
    """Both turns of one MT-Bench question on `llm` (batch 1); the generated token ids of each turn. Adds each
    turn's prompt tokens and those whose KV was reused from the earlier turn to `counts`; where `counts` has the
    keys, also notes the longest context and the most KV both models' caches held after a step ("context",
    "kv_peak")."""
    eng, tok = llm.engine, llm.tokenizer
    caches = [eng.kv] + ([eng.spec.draft_kv] if getattr(eng, "spec", None) is not None else [])
    messages, out = [], []
    for turn in question["turns"][:2]:
        messages.append({"role": "user", "content": turn})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        eng.add_request(prompt_token_ids=ids, params=sp, session_id=session)
        done = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done = o
            if "kv_peak" in counts:
                counts["kv_peak"] = max(counts["kv_peak"], sum(c.committed_bytes for c in caches))
        out.append(done.outputs[0].token_ids)
        if "context" in counts:
            counts["context"] = max(counts["context"], len(ids) + len(done.outputs[0].token_ids))
        counts["prompt"] += len(ids)
        counts["reused"] += done.num_cached_tokens
        messages.append({"role": "assistant", "content": done.outputs[0].text})
    if session is not None:
        eng.end_session(session)
    return out


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The options of the MT-Bench workload both speculative MT-Bench benchmarks share: threads, the model pair and
    how many questions."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="memfit-tiny", help="target: a bundled model's name or a directory")
    ap.add_argument("--draft", default="memfit-tiny-draft", help="draft: a bundled model's name or a directory")
    ap.add_argument("--conversations", type=int, default=16, help="the first N MT-Bench questions")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--gammas", default="1,2", help="num_speculative_tokens values; the re-prefill row uses the last")
    ap.add_argument("--max-tokens", type=int, default=96, help="per turn (eos ignored)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm import LLM, SamplingParams

    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()][: args.conversations]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    # the engine's and server's step, as the committed results ran (LLM's own CPU default is 2048)
    common = dict(dtype=args.dtype, threads=args.threads, max_num_seqs=1, max_num_batched_tokens=512)
    gammas = [int(g) for g in args.gammas.split(",")]
    spec = {g: dict(speculative_model=args.draft, num_speculative_tokens=g) for g in gammas}
    engines = {"plain": (LLM(args.model, **common), True)}  # name: (engine, keeps a session's KV between turns)
    for g in gammas:
        engines[f"speculative_g{g}"] = (LLM(args.model, **common, **spec[g]), True)
    engines[f"speculative_reprefill_g{gammas[-1]}"] = (
        LLM(args.model, enable_prefix_caching=False, **common, **spec[gammas[-1]]), False)
    outs: dict[str, list] = {}
    counts = {name: {"prompt": 0, "reused": 0} for name in engines}  # the last round's
    rounds = iter(range(10**9))

    def runner(name: str):
        llm, sessions = engines[name]

        def run() -> None:
            r = next(rounds)
            counts[name] = {"prompt": 0, "reused": 0}
            outs[name] = [conversation(llm, q, sp, f"{name}-{r}-{i}" if sessions else None, counts[name])
                          for i, q in enumerate(questions)]
        return run

    times = interleave({name: runner(name) for name in engines}, reps=args.reps, clock=time.process_time)
    tokens = len(questions) * 2 * args.max_tokens
    rows = []
    for name, (llm, sessions) in engines.items():
        st = llm.engine.stats()
        sp_st = st.get("speculative") or {}
        row = {"decoder": name, "session_kv_reuse": sessions, "tokens": tokens,
               "tok_s": tokens / statistics.median(times[name]),
               "token_acceptance": sp_st.get("token_acceptance"),
               "tokens_per_target_step": sp_st.get("tokens_per_seq_step"),
               "prompt_tokens": counts[name]["prompt"], "reused_prompt_tokens": counts[name]["reused"],
               "identical_tokens": outs[name] == outs["plain"]}
        row["vs_plain"] = row["tok_s"] / (tokens / statistics.median(times["plain"]))
        print(f"{row}", file=sys.stderr)
        rows.append(row)
        llm.engine.close()
    result = {"benchmark": "speculative_mtbench", **header(args.threads), "dtype": args.dtype, "clock": "cpu",
              "reps": args.reps, "conversations": len(questions), "gammas": gammas, "max_tokens": args.max_tokens,
              "target": args.model, "draft": args.draft, "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
