"""A step's activations where the step arena holds them (engine/step_arena.py, memory/scratch.py).

Where memfit's CPU kernels run, outside tensor parallelism, every decoder layer of a pass writes its residual stream,
norm and attention output, layer output and q|k|v (then the MLP's gate|up block) into the same four regions of one
arena (kernels/scratch_layout.py), so a step holds that layout once, not the pre-arena sum of a tensor per
intermediate (`accounting.activation_bytes` without `arena`). What a pass still allocates beside the arena is
counted here term by term, each from the code that allocates it:

- the layout itself: the arena's capacity, the largest layout of any step the scheduler can form (up to `rows_cap`
  tokens, padded as the runner pads them; not always the largest step's, see `arena_capacity_bytes`) in whole
  pages: the engine carves exactly that out of the step reservation;
- PyTorch tensors outside it: the step's token ids and positions (N int64 each), the embedding output (N, C) (it is
  layer 0's residual until its attention has run), the RoPE rows gathered for the step's positions (N, D) x 2,
  SiLU x up through PyTorch below SILU_MIN_ROWS rows (SiLU(gate) and the product, (N, I) each), and the sampled
  rows' hidden states (S, C) and logits (S, V) in the model's dtype, beside the float32 logits and their softmax
  the pre-arena figure already counts;
- the C kernels' scratch, from the C heap (std::vector; not PyTorch's allocator): a BlockedLinear call below
  LARGE_M rows packs x (M, K) step-major (cpu_blocked.cpp: run's xs; one block for each K of the model) and every
  thread sums into (M, NB) floats (run's and run_large's acc, at most M rows; in bf16 the MLP's fused gate/up call,
  run_large_silu in blocked_large.h, sums a gate panel and its up panel side by side: twice its rows); the prefill attention kernel packs one KV head's keys (Tk rounded to
  KB = 32 keys, x D) and every thread keeps a row block's scores (at most ROWS = 32 query rows x (Tk + KB) floats:
  24 rows on the AVX-512 path, 32 on the AMX path); in bf16 it packs one head's V as well (Tk rounded to KB x
  D) on either path, the AVX-512 path keeps its row block's P rounded to bf16 beside the scores (24 rows x (Tk +
  KB) bf16), and on AMX tiles it holds the threads' score rows as one block (cpu_prefill.cpp,
  `memfit_prefill_amx_scratch_bytes`); decode attention G = Hq / Hkv score rows of the context per thread (attend.h;
  on AMX tiles, attend_amx.h, rows padded to 32 tokens and G x D fp32 sums beside them). Each is counted in
  whole pages plus one (malloc's chunk header may push a block onto one more page, as `large_m.amx_scratch_bytes`
  counts the AMX kernel's), and they are added although they never live at once (freed heap pages may stay
  resident until the heap is trimmed);
- the many-row matmuls' AMX scratch, as before (`accounting.matmul_scratch_bytes`).
"""
from __future__ import annotations

# Whether the engine's ledger (and `memfit fit` by default) reserves the arena figure below instead of the
# pre-arena one. On since `tests/llm/engine/test_arena_ledger.py`'s per-step bound ran on an AMX Xeon (bf16 and
# float32, plain, chain and tree): it failed there 1 run in 8 (a 160-row bf16 step 99,328 B over) while the AMX
# matmul's scratch was counted for the largest K only; a freed scratch block of a smaller K stays a hole the
# next, larger one cannot reuse, so `large_m.amx_scratch_bytes` now counts one a distinct K (+110,592 B for
# memfit-tiny at 160 rows), and the bound held in 10 runs of 10 and 2 whole-file runs.
LEDGER_USES_ARENA = True

import torch

from memfit.llm.models.config import ModelConfig

PAGE = 4096
SMALL_STEP, STEP_BUCKET = 64, 32  # engine/runner.py: bucket_tokens (not imported: runner loads the model code)
BLOCKED_NB = 64  # cpu_blocked.cpp: NB = 16 x P columns a panel, P <= 4
LARGE_M = 64  # cpu_blocked.cpp: BLK_LARGE_M (from this many rows x is read in place, not packed)
PREFILL_KB, PREFILL_ROWS = 32, 32  # cpu_prefill.cpp: keys per packed block, query rows whose scores are kept
PREFILL_AVX512_ROWS = 24  # cpu_prefill.cpp's ROWS: the AVX-512 path's row block (its bf16 P copy)
SILU_MIN_ROWS = 8  # kernels/decode.py: below this many rows SiLU x up runs through PyTorch
DECODE_BY_SEQ_MIN_LEN = 256  # cpu_decode.cpp: BY_SEQ_MIN_LEN (from this context on attend_heads may read a sequence;
# it also needs a step or sequence size that depends on the CPU: counted from the context alone, the larger scratch)


def bucket_tokens(n: int) -> int:
    """Rows the model computes for a step of `n` real tokens (engine/runner.py: bucket_tokens)."""
    return n if n <= SMALL_STEP else -(-n // STEP_BUCKET) * STEP_BUCKET


def _heap_block(nbytes: int) -> int:
    """The pages a C heap block of `nbytes` may make resident: whole pages plus one (0 for none)."""
    return (-(-nbytes // PAGE) + 1) * PAGE if nbytes > 0 else 0


def step_sizes(rows_cap: int) -> list[int]:
    """Every row count a step of 1 to `rows_cap` real tokens is padded to (`bucket_tokens`), ascending."""
    return [*range(1, min(rows_cap, SMALL_STEP) + 1),
            *range(bucket_tokens(SMALL_STEP + 1), bucket_tokens(rows_cap) + 1, STEP_BUCKET)]


def arena_capacity_bytes(cfg: ModelConfig, dtype: torch.dtype, rows_cap: int, mlp_block: int = 0) -> int:
    """The arena the engine builds for steps of up to `rows_cap` real tokens (step_arena.capacity_bytes), in whole
    pages: the largest layout of any step size, which is not always the largest step's. The MLP's gate|up takes
    the WORK region for its largest call (scratch_layout.mlp_rows), and a step of twice the row block or more runs
    it in blocks: with bf16's 256-row blocks and 512-token steps a 480-row step's whole-step MLP needs 1.4x the
    layout of a 512-row one (memfit-tiny). Sized for 512 rows, such a step did not fit the arena and ran every
    intermediate on the C heap beside it, uncounted: 3.3 MB of tensors at once, 6 MB of heap pages, in
    tests/llm/engine/budget_probe.py's steps of a second prefill chunk beside 18 decodes."""
    from memfit.llm.kernels.scratch_layout import step_bytes

    layout = max(step_bytes(cfg, rows, dtype, mlp_block) for rows in step_sizes(rows_cap))
    return -(-layout // PAGE) * PAGE


def largest_outside_arena_bytes(cfg: ModelConfig, dtype: torch.dtype, rows_cap: int, context_len: int,
                                sampled_rows: int, mlp_block: int = 0) -> int:
    """`outside_arena_bytes` of the step size that allocates most beside the arena, of every step of up to `rows_cap`
    real tokens: not always the largest either (the C kernels' sum blocks follow the MLP's largest call, and below
    LARGE_M rows a linear packs its x)."""
    return max(outside_arena_bytes(cfg, dtype, rows, context_len, sampled_rows, mlp_block)
               for rows in step_sizes(rows_cap))


def _prefill_on_amx() -> bool:
    """Whether memfit's bf16 prefill attention runs on AMX tiles in this process (kernels/prefill.py)."""
    from memfit.llm.kernels.prefill import kernel_for

    return kernel_for(torch.bfloat16) == "amx"


def _decode_on_amx() -> bool:
    """Whether memfit's bf16 decode attention runs on AMX tiles in this process (kernels/decode.py)."""
    from memfit.llm.kernels.decode import decode_amx_on

    return decode_amx_on()


def kernel_scratch_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int, context_len: int, mlp_block: int = 0,
                         threads: int | None = None) -> int:
    """The C kernels' heap scratch in a pass of `rows` rows of sequences of up to `context_len` tokens (their chunks
    included; see the module doc)."""
    from memfit.llm.kernels.scratch_layout import mlp_rows

    item = dtype.itemsize
    t = threads or torch.get_num_threads()
    c, i = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    # x packed for each distinct K (C, Hq*D, I), K rounded up to a bf16 pair: a freed block may stay as a hole in
    # the heap that a larger one cannot reuse, so each is counted; one sum block a thread, of the most rows
    m_mlp = mlp_rows(rows, mlp_block)
    sums = max(rows, 2 * m_mlp if dtype == torch.bfloat16 else m_mlp)  # rows of one thread's sum block (see above)
    linear = sum(_heap_block(m * (k + 1) * item) for m, k in {(rows, c), (rows, q), (m_mlp, c), (m_mlp, i)}
                 if m < LARGE_M) + t * _heap_block(sums * BLOCKED_NB * 4)
    tk = -(-max(context_len, 1) // PREFILL_KB) * PREFILL_KB  # keys a row may see (its context), in whole blocks
    # K packed, and in bf16 V too (key pairs, on either path: AMX tiles or pv_tile_bf16); the AVX-512 path's bf16
    # also keeps its row block's P rounded to bf16 beside the fp32 scores (its 24 rows, in the model's dtype)
    bf16 = dtype == torch.bfloat16
    packed = 2 if bf16 else 1
    hq, hkv = cfg.num_attention_heads, max(1, cfg.num_key_value_heads)
    g = hq // hkv  # a row block holds whole GQA groups: G rows where a group is larger than the block (G > 24)
    prefill = (packed * _heap_block(tk * cfg.head_dim * item)
               + t * _heap_block(max(PREFILL_ROWS, g) * (tk + PREFILL_KB) * 4))
    if bf16 and not _prefill_on_amx():
        prefill += t * _heap_block(max(PREFILL_AVX512_ROWS, g) * (tk + PREFILL_KB) * item)
    scores = hq // hkv * context_len  # attend.h's attend_group: G score rows of the context
    if 2 <= hkv <= 16 and context_len >= DECODE_BY_SEQ_MIN_LEN:
        # attend_heads (a per-layer cache, a long context): every head's scores, running maxima and fp32 outputs
        scores = max(scores, hq * context_len + hq * (16 + cfg.head_dim) + 16)
    if bf16 and g <= 16 and cfg.head_dim % 32 == 0 and cfg.head_dim <= 128 and _decode_on_amx():
        # attend_amx.h: score rows padded to 32 tokens (P's tiles) and fp32 sums, G of each a head, Hq where a
        # per-layer cache is read a sequence at a time (attend_heads_amx)
        score_rows = hq if 2 <= hkv <= 16 and context_len >= DECODE_BY_SEQ_MIN_LEN else g
        scores = max(scores, score_rows * (-(-context_len // 32) * 32) + score_rows * cfg.head_dim + 16)
    decode = t * _heap_block(scores * 4)
    return linear + prefill + decode


def outside_arena_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int, context_len: int, sampled_rows: int,
                        mlp_block: int = 0) -> int:
    """What a pass of `rows` rows (the padded step) allocates beside the arena, the head's output in the model's dtype
    included; not the logits' float32 copy, the sampler's scratch or the AMX scratch (counted by
    `accounting.activation_bytes` either way)."""
    item = dtype.itemsize
    c = cfg.hidden_size
    tensors = (2 * rows * 8 + rows * c * item + 2 * rows * cfg.head_dim * item
               + (2 * rows * cfg.intermediate_size * item if rows < SILU_MIN_ROWS else 0)
               + sampled_rows * (c + cfg.vocab_size) * item)
    return tensors + kernel_scratch_bytes(cfg, dtype, rows, context_len, mlp_block)


def step_in_arena_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int, context_len: int, sampled_rows: int,
                        mlp_block: int = 0) -> int:
    """What one pass of `rows` rows (the padded step) holds at most with the arena: its own layout's pages (the
    arena commits a step's layout, not its capacity) and what it allocates beside the arena (the head's output
    included), except the logits' float32 copy, the sampler's scratch and the AMX scratch. `accounting.activation_bytes` counts the capacity instead."""
    from memfit.llm.kernels.scratch_layout import step_bytes

    layout = -(-step_bytes(cfg, rows, dtype, mlp_block) // PAGE) * PAGE
    return layout + outside_arena_bytes(cfg, dtype, rows, context_len, sampled_rows, mlp_block)
