"""The Hugging Face peer of benchmarks/speculative_mtbench_four.py: transformers' own assisted generation
(`model.generate(..., assistant_model=draft)`) on the same target/draft pair and MT-Bench two-turn workload.

One run is one fresh process (`--worker hf_assisted` of the four-decoder script), measured as the memfit decoders
are: both checkpoints loaded from their safetensors as transformers' LlamaForCausalLM in the same dtype, one warm-up
conversation outside the workload, then the workload; throughput is generated tokens over the process's CPU time
(prefills included); generation memory is the peak held memory (VmHWM reset before the workload, less file pages)
minus what the loaded models held, both after `malloc_trim`.

The workload is memfit's: the prompt of each turn is rendered and encoded by memfit's tokenizer (the same chat
template), turn 2 carries turn 1's answer as memfit's engine detokenizes it (`TextStream`), so where the tokens equal
vanilla decoding's, so do the prompts. Greedy, `max_new_tokens` per turn and no stop on eos (eos_token_id None, so
eos is neither a stop nor masked: memfit's `ignore_eos`). transformers keeps no KV between turns: each `generate`
prefills the whole conversation, in both models.

Assisted generation drafts a fixed chain of `gamma` tokens per step (num_assistant_tokens_schedule "constant",
no confidence cut-off), the chain the memfit decoders verify. It keeps no counters, so its candidate generator is
watched here: each step's drafts (what `get_candidates` adds) and kept drafts (`update_candidate_strategy`'s
num_matches) give memfit's figures: acceptance = kept / (kept + steps that ended at a rejection), tokens per target
step = (kept + steps) / steps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent.parent / "memfit" / "data" / "mt_bench" / "question.jsonl"


class _Watch:
    """Per assisted-generation step: how many drafts the candidate generator proposed and how many were kept."""

    def __init__(self) -> None:
        from transformers.generation.candidate_generator import AssistedCandidateGenerator as Gen

        self.steps = self.kept = self.rejections = 0
        self._proposed = 0
        get, update = Gen.get_candidates, Gen.update_candidate_strategy

        def get_candidates(gen, input_ids, **kw):
            ids, logits = get(gen, input_ids, **kw)
            self._proposed = ids.shape[1] - input_ids.shape[1]  # (1, T + k) from (1, T)
            return ids, logits

        def update_candidate_strategy(gen, input_ids, scores, num_matches):
            self.steps += 1
            self.kept += int(num_matches)
            self.rejections += int(num_matches) < self._proposed
            return update(gen, input_ids, scores, num_matches)

        Gen.get_candidates, Gen.update_candidate_strategy = get_candidates, update_candidate_strategy  # this process

    def reset(self) -> None:
        self.steps = self.kept = self.rejections = 0


def _conversation(target, draft, tok, question: dict, configs, counts: dict) -> list[list[int]]:
    """Both turns of one question through `target.generate(assistant_model=draft)`; each turn's generated ids."""
    import torch

    from memfit.llm.engine.textstream import TextStream

    messages, out = [], []
    for turn in question["turns"][:2]:
        messages.append({"role": "user", "content": turn})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        x = torch.tensor([ids], dtype=torch.long)  # (1, T)
        y = target.generate(x, attention_mask=torch.ones_like(x), generation_config=configs, assistant_model=draft)
        new = y[0, len(ids):].tolist()
        stream = TextStream(tok)
        stream.add(new)
        out.append(new)
        counts["context"] = max(counts["context"], len(ids) + len(new))
        counts["prompt"] += len(ids)
        messages.append({"role": "assistant", "content": stream.emit(final=True)[0]})
    return out


def hf_worker(a: dict) -> dict:
    """One run of transformers' assisted generation in this (fresh) process: load, warm up, run the workload."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from benchmarks.common import pin_threads
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.tokenizer import Tokenizer
    from memfit.memory.mapping import get_libc
    from memfit.memory.measure import anon_shmem_bytes, peak_rss_bytes, reset_peak_rss, status_bytes

    pin_threads(a["threads"])
    torch.set_grad_enabled(False)
    dtype = getattr(torch, a["dtype"])
    target_dir, draft_dir = resolve_model_path(a["model"]), resolve_model_path(a["draft"])
    target = LlamaForCausalLM.from_pretrained(target_dir, dtype=dtype, use_safetensors=True).eval()
    draft = LlamaForCausalLM.from_pretrained(draft_dir, dtype=dtype, use_safetensors=True).eval()
    tok = Tokenizer.from_dir(target_dir)
    # Greedy, no stop on eos, a fixed chain of gamma drafts: set on both models, so neither checkpoint's
    # generation_config.json (sampling defaults) is merged in.
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id or 0)
    configs = GenerationConfig(max_new_tokens=a["max_tokens"], num_assistant_tokens=a["gamma"],
                               num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0, **greedy)
    draft.generation_config = GenerationConfig(num_assistant_tokens=a["gamma"],
                                               num_assistant_tokens_schedule="constant",
                                               assistant_confidence_threshold=0.0, **greedy)
    watch = _Watch()
    lines = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    questions, warm = lines[: a["conversations"]], lines[-1]
    trim = get_libc().malloc_trim
    trim(0)
    loaded = anon_shmem_bytes()
    seen = {"context": 0, "prompt": 0}
    _conversation(target, draft, tok, warm, configs, dict(seen))
    trim(0)
    watch.reset()
    hwm = reset_peak_rss()
    t0 = time.process_time()
    outs = [_conversation(target, draft, tok, q, configs, seen) for q in questions]
    cpu_s = time.process_time() - t0
    peak_held = (peak_rss_bytes() - status_bytes()["RssFile"]) if hwm else None
    tokens = sum(len(t) for o in outs for t in o)
    tested = watch.kept + watch.rejections
    return {"decoder": "hf_assisted", "cpu_s": cpu_s, "tokens": tokens, "tok_s": tokens / cpu_s,
            "token_acceptance": watch.kept / tested if tested else None,
            "tokens_per_target_step": (watch.kept + watch.steps) / watch.steps if watch.steps else None,
            "generation_memory_bytes": None if peak_held is None else peak_held - loaded,
            "kv_committed_at_load_bytes": 0, "kv_committed_peak_bytes": None, "loaded_without_kv_bytes": loaded,
            "ledger_weights_bytes": None, "max_context": seen["context"], "prompt_tokens": seen["prompt"],
            "reused_prompt_tokens": 0, "transformers": __import__("transformers").__version__, "outputs": outs}
