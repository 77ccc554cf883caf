"""One step's chain speculation (engine/spec_decode.py, steps 2-4): the draft proposes g tokens per sequence, one
pass each, the target verifies every chain in one pass, rejection sampling (or, all greedy, comparing argmaxes)
keeps the accepted drafts, and both caches are truncated to what was emitted. A function of the `SpecDecoder`,
as the tree's step is (engine/spec_tree_step.py): it reads the decoder's runners, draft KV, sampler, trackers and
stats and writes its stats and timings."""
from __future__ import annotations

import time
from typing import Any

import torch

from memfit.llm.engine.request import Sequence
from memfit.llm.engine.spec_forward import forward
from memfit.llm.engine.speculative import AcceptanceTracker, draw, greedy_verdict, rejection_sample
from memfit.llm.engine.step import StepResult

# `dec` below is the engine's SpecDecoder (engine/spec_decode.py, which imports this module, so it is not imported
# back): its target and draft runners, draft_kv, sampler, adaptive, _trackers, stats, _catch_up, _time, _logprobs.


def speculate_chain(dec: Any, spec: list[tuple[Sequence, int]], result: StepResult) -> None:
    """Draft, verify and roll back the chains of `spec` (sequence, g) pairs; rows with g = 0 are plain decode rows
    that only take part in the verification pass (engine/spec_decode.py, steps 2-4)."""
    seqs = [s for s, _ in spec]
    gammas = [g for _, g in spec]
    B, K = len(seqs), max(gammas)
    params = [s.params for s in seqs]
    dev = dec.target.device
    # All greedy: p and q are one-hot, so the picks are argmaxes and the rule compares them (greedy_verdict),
    # with no distributions, uniforms or draws built (they cost ~a fifth of a step on the bundled pair).
    greedy = all(p.greedy for p in params)
    u = None if greedy else _uniforms(dec, seqs, 2 * K + 1).to(dev)  # (B, 2K+1): K draft, K accept, 1 final
    dec._catch_up([s for s, g in spec if g])
    t0 = time.perf_counter()
    # 2. the draft proposes: catch up on what it has not seen, then one token per pass.
    drafts: list[list[int]] = [[] for _ in range(B)]  # row b: its gammas[b] drafts
    q = None  # (B, K, V) draft distributions (sampling only)
    for j in range(K):
        rows = [b for b in range(B) if gammas[b] > j]
        chunks = []
        for b in rows:
            s = seqs[b]
            if j == 0:
                start = dec.draft_kv.num_tokens(s.seq_id)
                chunks.append((s.seq_id, start, s.token_slice(start, s.num_tokens)))
            else:
                chunks.append((s.seq_id, s.num_tokens + j - 1, [drafts[b][j - 1]]))
        logits = forward(dec.draft, chunks, all_rows=False)  # (R, V)
        if greedy:
            picks = dec.draft.sampler.ops.argmax(logits).tolist()  # plain decoding's pick, ties included
        else:
            idx = torch.tensor(rows, device=dev)
            probs = dec.draft.sampler.probs(logits, [params[b] for b in rows])
            if q is None:
                q = torch.zeros(B, K, probs.shape[1], dtype=torch.float32, device=dev)
            q[idx, j] = probs
            picks = draw(probs, u[idx, j]).tolist()  # type: ignore[index]
        for b, tok in zip(rows, picks):
            drafts[b].append(tok)
    t1 = time.perf_counter()
    # 3. the target verifies every draft in one pass: p at the g + 1 positions of each sequence.
    chunks = [(s.seq_id, s.num_computed, s.token_slice(s.num_computed, s.num_tokens) + drafts[b])
              for b, s in enumerate(seqs)]
    verify = getattr(dec.target, "forward_chunks", None)  # tensor parallel: rank 0 sends the pass to the workers
    logits = verify(chunks, True) if verify else forward(dec.target, chunks, all_rows=True)  # (sum(g + 1), V)
    dec._time(t1 - t0, K, time.perf_counter() - t1)
    starts = [sum(gammas[:b]) + b for b in range(B)]  # each sequence's first row of the logits
    if greedy:
        picks = dec.sampler.ops.argmax(logits).tolist()  # the target's pick at every position
        emitted = greedy_verdict(drafts, [picks[starts[b] : starts[b] + g + 1] for b, g in enumerate(gammas)])
    else:
        row_params = [params[b] for b in range(B) for _ in range(gammas[b] + 1)]
        p_flat = dec.sampler.probs(logits, row_params)  # (sum(g + 1), V)
        if all(g == K for g in gammas):  # every row drafted K: the rows are already (B, K + 1, V), no copy
            p = p_flat.view(B, K + 1, -1)
        else:
            p = torch.zeros(B, K + 1, p_flat.shape[1], dtype=torch.float32, device=dev)
            for b, g in enumerate(gammas):
                p[b, : g + 1] = p_flat[starts[b] : starts[b] + g + 1]
        del p_flat
        drafts_t = torch.tensor([d + [0] * (K - len(d)) for d in drafts], device=dev)  # (B, K)
        emitted = rejection_sample(drafts_t, torch.tensor(gammas, device=dev), q, p,  # type: ignore[arg-type]
                                   u[:, K : 2 * K], u[:, 2 * K]).emitted()  # type: ignore[index]
    # 4. keep what was accepted, truncate the rest from both caches, hand the tokens to the engine.
    first = 0
    for b, s in enumerate(seqs):
        n = len(emitted[b]) - 1
        length = s.num_tokens  # before this step's tokens are appended
        dec.target.kv.truncate(s.seq_id, length + n)
        s.num_computed = length + n  # the last emitted token is fed next step
        if gammas[b]:
            dec.draft_kv.truncate(s.seq_id, length + min(n, gammas[b] - 1))
        lps = dec._logprobs(logits[first : first + n + 1], s, emitted[b])
        first += gammas[b] + 1
        for tok, lp in zip(emitted[b], lps):
            result.sampled_seqs.append(s)
            result.token_ids.append(tok)
            result.logprobs.append(lp)
        if not gammas[b]:
            continue
        if dec.adaptive:
            dec._trackers.setdefault(s.seq_id, AcceptanceTracker()).update(n, gammas[b])
        dec.stats.proposed += gammas[b]
        dec.stats.accepted += n
        dec.stats.rejections += n < gammas[b]
        dec.stats.emitted += n + 1
        dec.stats.seq_steps += 1
    dec.stats.steps += 1


def _uniforms(dec: Any, seqs: list[Sequence], n: int) -> torch.Tensor:
    """(B, n) U[0, 1): seeded requests draw from their own generator, greedy ones need none (zeros)."""
    gens = dec.sampler.generators_for([(s.request_id, s.params.seed) for s in seqs])
    u = torch.rand(len(seqs), n)
    for b, (s, g) in enumerate(zip(seqs, gens)):
        if s.params.greedy:
            u[b] = 0.0
        elif g is not None:
            u[b] = torch.rand(n, generator=g)
    return u
