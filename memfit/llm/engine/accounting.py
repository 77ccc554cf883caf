"""What the engine reserves in its memory ledger, and what `memfit fit` predicts: one set of formulas.

The engine (llm_engine.py) reserves each part below in its `MemoryBudget` ledger before it allocates, and
`memfit fit` adds the same parts up for a model it has not loaded, so the two cannot drift apart.

- weights: what the model holds after `prepare_model`, by backend (see `weights_bytes`): the checkpoint's
  own mapped pages where a tensor is used as stored (made resident at load, so they are counted in full),
  and the packed copies that replace a matrix otherwise (memfit's blocked layout pads N to whole panels and
  K to whole steps, in one arena of whole 2 MiB pages). A tied head that is packed is also the embedding
  (`BlockedEmbedding` looks tokens up in it), so the matrix is held once.
- tokenizer: the Rust tokenizer's tables, estimated from the size of tokenizer.json (`tokenizer_bytes`).
- step: the largest step the scheduler can form, activations and logits (`activation_bytes`; without memfit's
  kernels, also PyTorch ops' temporaries and oneDNN's row padding: engine/fallback_accounting.py; where the engine's
  step arena holds a step's intermediates, its capacity and what a step allocates beside it:
  arena_accounting.py), plus the RoPE tables and the decode attention's K/V workspace (`workspace_bytes`).
- shape_cache: where the linears are oneDNN's (`cpu_linear` "onednn"), the kernels oneDNN and PyTorch's ideep
  compile per input shape and keep for the rest of the process (`fallback_accounting.shape_cache_bytes`: a fixed
  set of shapes, since models/packing.py pads every call's rows to a bucket).
- runtime: what running the engine adds that no formula of the model gives: library code paged in by the
  kernels, allocator pools, oneDNN's primitive caches. Measured once per machine and build by
  `calibrate.py` (a tiny model run in a fresh process, minus its own accounted parts) and cached.
- KV: the virtual cache's committed pages for the workload (`kv_cache_bytes`); in the engine, what the
  ledger has left is the KV cache's share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from memfit.llm.engine.candidates import sampler_scratch_bytes
from memfit.llm.engine.fallback_accounting import linear_shapes
from memfit.llm.models.config import ModelConfig

PAGE = 4096
HUGE_PAGE = 2 * 1024 * 1024
BLOCKED_NB = 64  # memfit.llm.kernels.blocked.DEFAULT_NB (not imported at load: that module loads the C++ kernel)
# memfit.llm.kernels.blocked.LARGE_M: the MLP's row block where the blocked kernel runs float32 (bf16 has a
# larger one: mlp_row_block imports blocked, when called, to ask)
BLOCKED_LARGE_M = 64
TOKENIZER_BYTES_PER_FILE_BYTE = 2  # the tokenizers library's tables vs its JSON (see tokenizer_bytes)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def blocked_packed_bytes(n: int, k: int, dtype: torch.dtype, nb: int = BLOCKED_NB) -> int:
    """Bytes of an (n, k) matrix in memfit's blocked layout (cpu_blocked.cpp: memfit_blocked_packed_elems)."""
    span = 2 if dtype == torch.bfloat16 else 1
    return _round_up(n, nb) * _round_up(k, span) * _itemsize(dtype)


def weights_bytes(cfg: ModelConfig, dtype: torch.dtype, cpu_linear: str | None, device_type: str = "cpu",
                  mapped: bool = True) -> int:
    """Bytes the loaded, prepared model holds.

    cpu_linear: the backend `choose_cpu_linear` picked ("blocked" | "onednn" | "memfit" | None).
    mapped: the checkpoint is stored in `dtype` (its tensors are views of the mapped file; a tied head can
    then be packed, see memfit.llm.kernels.blocked)."""
    itemsize = _itemsize(dtype)
    raw = cfg.num_parameters() * itemsize  # a tied matrix counted once
    if device_type != "cpu" or cpu_linear not in ("blocked", "onednn"):
        return raw  # used as stored (or, on a GPU, copied once; fused copies replace the originals)
    shapes = linear_shapes(cfg, fused=True)
    head_packed = not cfg.tie_word_embeddings or mapped
    if not head_packed:
        shapes = shapes[:-1]
    if cpu_linear == "onednn":
        return raw  # oneDNN's blocked weights: the same bytes (its padding is below a page per matrix)
    linear_raw = sum(n * k for n, k in shapes) * itemsize
    packed = sum(_round_up(blocked_packed_bytes(n, k, dtype), 64) for n, k in shapes)
    arena = _round_up(packed, HUGE_PAGE)  # one HostArena of whole huge pages, all of it written by packing
    return raw - linear_raw + arena


def kv_cache_bytes(cfg: ModelConfig, dtype: torch.dtype, context_len: int, batch: int, page: int = PAGE) -> int:
    """Committed KV bytes for `batch` sequences of `context_len` tokens in the virtual cache (per-layer
    layout, the CPU default): each (layer, K|V) segment of a sequence is committed in whole pages."""
    row = cfg.num_key_value_heads * cfg.head_dim * _itemsize(dtype)  # one token of K (or V) in one layer
    per_segment = _round_up(context_len * row, page)
    return batch * 2 * cfg.num_hidden_layers * per_segment


def attention_in_place(device_type: str, dtype: torch.dtype, cpu_kernels: bool) -> bool:
    """Whether memfit's CPU attention kernels run (kernels/decode.py, kernels/prefill.py): they read the KV
    cache in place, so a step makes no head-major K/V copy and no causal mask. Compiles them on first call."""
    if not (cpu_kernels and device_type == "cpu"):
        return False
    from memfit.llm.kernels.decode import CpuDecodeOps

    return CpuDecodeOps.available(dtype)


def mlp_row_block(device_type: str, cpu_linear: str | None, dtype: torch.dtype) -> int:
    """The MLP's row block (models/llama.py: MLP.row_block, set by kernels/backends.mlp_row_blocks): memfit's
    blocked kernel on a CPU (BLOCKED_LARGE_M rows; for `dtype` bf16 kernels/blocked.mlp_row_block's larger block);
    0 (whole steps) otherwise."""
    if device_type != "cpu" or cpu_linear != "blocked":
        return 0
    from memfit.llm.kernels.blocked import mlp_row_block as kernel_block

    return kernel_block(dtype)


def mlp_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk: int, mlp_block: int = 0) -> int:
    """The MLP's transients beside its (chunk, hidden) output: gate, up and silu(gate) * up of the rows in one
    call (the chunk, or at most 2 x mlp_block - 1 rows where it runs in blocks), and in blocks also the block's
    own down-projection output, held until it is copied into the output (models/llama.py: MLP.forward)."""
    itemsize = _itemsize(dtype)
    blocked = bool(mlp_block) and chunk >= 2 * mlp_block
    rows = 2 * mlp_block - 1 if blocked else chunk
    return 3 * rows * cfg.intermediate_size * itemsize + (rows * cfg.hidden_size * itemsize if blocked else 0)


def matmul_scratch_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk: int, mlp_block: int = 0) -> int:
    """What a prefill step's many-row matmuls allocate beside their outputs while one runs: the AMX kernel's
    per-thread scratch (x's row block packed into tiles, two column blocks' sums: ~0.8-1.1 MiB a thread for
    K of 768-2048), where memfit's blocked kernel runs (`mlp_block` nonzero, `mlp_row_block`) in bf16 on a
    core with AMX and the step reaches BLOCKED_LARGE_M rows (kernels/large_m.amx_scratch_bytes); 0 elsewhere
    (the AVX-512 kernel's scratch is a few KiB). On a CPU without a native bf16 multiply (kernels/upcast.py), the
    float32 scratch its bf16 linears share, sized for the step's rows and the largest K (`upcast.scratch_bytes`)."""
    if dtype == torch.bfloat16 and not mlp_block:
        from memfit.llm.kernels import upcast

        if upcast.available(dtype):
            return upcast.scratch_bytes(max(k for _, k in linear_shapes(cfg, fused=False)), chunk)
    if not mlp_block or dtype != torch.bfloat16 or chunk < BLOCKED_LARGE_M:
        return 0
    from memfit.llm.kernels import large_m

    ks = {k for _, k in linear_shapes(cfg, fused=True)}
    return large_m.amx_scratch_bytes(chunk, ks, torch.get_num_threads())


def sampled_logits_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """The sampled rows' logits at the sampler's peak: the head's output (rows, V) in the model's dtype, its float32
    copy where that dtype is narrower (`Sampler.sample` and `Sampler.probs` widen with .float(): bf16 cumsums over
    a large vocabulary lose too much), and the softmax or top-k/top-p search's scratch beside them
    (engine/candidates.py). In bf16 that is 2 + 4 bytes a logit before the scratch, not 4."""
    widened = rows * vocab * 4 if _itemsize(dtype) < 4 else 0
    return rows * vocab * _itemsize(dtype) + widened + sampler_scratch_bytes(rows, vocab)


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk: int, context_len: int, sampled_rows: int,
                     in_place: bool = False, mlp_block: int = 0, arena_rows: int = 0, packed: bool = False) -> int:
    """Peak transient memory of one step of `chunk` tokens against `context_len` tokens of context, sampling
    `sampled_rows` rows: the residual stream and norms, q/k/v/o, the MLP's intermediates (of one block of rows,
    at most 2 x mlp_block - 1, where the MLP runs in blocks: `mlp_row_block`), the attention mask (none where
    memfit's kernels attend in place, `in_place`), the float32 logits with their softmax, and the many-row
    matmuls' scratch (`matmul_scratch_bytes`).

    arena_rows > 0: the engine's step arena (engine/step_arena.py) holds the intermediates of every step of up to
    that many tokens. Where memfit's kernels attend in place (`in_place`) and its blocked linears (`mlp_block`
    nonzero: `mlp_row_block` is only there) write into the arena (`out=`), the figure is the arena's capacity and
    what a step allocates beside it (engine/arena_accounting.py), not a tensor per intermediate; elsewhere (other
    linears, a head size the prefill kernel lacks) the intermediates are tensors of their own, as counted here.

    Without memfit's kernels (`in_place` False) PyTorch's ops add their temporaries, and with oneDNN's linears
    (`packed`: `cpu_linear` "onednn") their row padding (engine/fallback_accounting.py); there every row-sized term is
    of the rows the runner computes (`chunk` padded: runner.bucket_tokens)."""
    from memfit.llm.kernels.prefill import HEAD_SIZES

    logits = sampled_logits_bytes(sampled_rows, cfg.vocab_size, dtype)
    if arena_rows > 0 and in_place and mlp_block > 0 and cfg.head_dim in HEAD_SIZES:
        from memfit.llm.engine import arena_accounting as arena

        capacity = arena.arena_capacity_bytes(cfg, dtype, max(arena_rows, chunk), mlp_block)
        beside = arena.largest_outside_arena_bytes(cfg, dtype, chunk, context_len, sampled_rows, mlp_block)
        # `beside` counts the head's output already (in the model's dtype): only its widened copy and the
        # sampler's scratch are added
        head = sampled_rows * cfg.vocab_size * _itemsize(dtype)
        return capacity + beside + logits - head + matmul_scratch_bytes(cfg, dtype, chunk, mlp_block)
    from memfit.llm.engine import fallback_accounting as fb

    extra = 0
    if not in_place:
        chunk = arena_bucket(chunk)
        extra = fb.torch_ops_bytes(cfg, dtype, chunk)
    if packed:  # linears padded to oneDNN's row buckets, whether or not memfit's kernels attend in place
        extra += fb.row_padding_bytes(cfg, dtype, chunk, sampled_rows)
    itemsize = _itemsize(dtype)
    h = cfg.hidden_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    residual = 4 * chunk * h * itemsize + chunk * h * 4  # x, normed x, attn out, mlp out; float32 norm
    attn = chunk * (2 * q + 2 * kv) * itemsize  # q, k, v, attention output
    # PyTorch's CPU attention (flash, blocked) never holds the chunk's whole score matrix: what grows with the
    # context is the causal mask of a chunk that does not start at 0 (bool) and its float form. memfit's
    # prefill kernel needs no mask, for the head sizes it takes.
    scores = 0 if in_place and cfg.head_dim in HEAD_SIZES else chunk * context_len * 5
    mlp = mlp_bytes(cfg, dtype, chunk, mlp_block)
    return residual + attn + scores + mlp + logits + matmul_scratch_bytes(cfg, dtype, chunk, mlp_block) + extra


def arena_bucket(n: int) -> int:
    """The rows the runner computes for a step of `n` tokens (engine/runner.py: bucket_tokens)."""
    from memfit.llm.engine.arena_accounting import bucket_tokens

    return bucket_tokens(n)


def workspace_bytes(cfg: ModelConfig, dtype: torch.dtype, context_len: int, batch: int, in_place: bool = False) -> int:
    """RoPE tables (positions up to the context x head_dim, cos and sin: the engine limits them to its
    max_model_len) and, in bf16/fp16 where memfit's kernels do not attend in place, the decode attention's
    workspace: one layer's K and V of the decode batch copied head-major (`decode_batch.Workspace`, kept between
    steps)."""
    itemsize = _itemsize(dtype)
    rope = 2 * min(cfg.max_position_embeddings, context_len) * cfg.head_dim * itemsize
    copies = not in_place and dtype != torch.float32
    decode = 2 * batch * context_len * cfg.num_key_value_heads * cfg.head_dim * itemsize if copies else 0
    return rope + decode


def step_bytes(cfg: ModelConfig, dtype: torch.dtype, chunk: int, context_len: int, batch: int,
               in_place: bool = False, mlp_block: int = 0, arena: bool = False, packed: bool = False) -> int:
    """The step reservation: activations of a `chunk`-token step plus the workspace of a `batch` decode;
    `in_place`: memfit's CPU attention kernels run (`attention_in_place`); `mlp_block`: `mlp_row_block`;
    `arena`: the engine builds its step arena for steps of up to `chunk` tokens (a CPU engine outside tensor
    parallelism; it applies where `in_place` does, see `activation_bytes`); `packed`: the linears are oneDNN's."""
    return activation_bytes(cfg, dtype, min(chunk, context_len), context_len, batch, in_place, mlp_block,
                            chunk if arena else 0, packed) + workspace_bytes(cfg, dtype, context_len, batch, in_place)


def draft_step_bytes(target: ModelConfig, draft: ModelConfig, dtype: torch.dtype, chunk: int, context_len: int,
                     batch: int, in_place: bool = False, mlp_block: int = 0, arena: bool = False,
                     packed: bool = False) -> int:
    """The draft's step reservation beside the target's: its workspace (RoPE tables, decode copies) is its own,
    but its activations are transient and never live at the same time as the target's (the two models run one
    after the other, and share the step arena where there is one), so only what they exceed the target's by is
    added (nothing for a smaller draft)."""
    n = min(chunk, context_len)
    rows = chunk if arena else 0
    extra = activation_bytes(draft, dtype, n, context_len, batch, in_place, mlp_block, rows, packed) - \
        activation_bytes(target, dtype, n, context_len, batch, in_place, mlp_block, rows, packed)
    return workspace_bytes(draft, dtype, context_len, batch, in_place) + max(0, extra)


def speculation_bytes(vocab_size: int, gamma: int, batch: int, dtype: torch.dtype = torch.float32) -> int:
    """Speculative decoding's buffers at their peak (engine/spec_decode.py: a sampled chain's verification), in
    rows of V: the verification logits (g + 1 a sequence) with their float32 copy in a narrower model dtype and
    the sampler's scratch while it makes the target's distributions (`sampled_logits_bytes`), the target's
    distributions (g + 1) and the draft's (g), float32."""
    rows = batch * (gamma + 1)
    return (rows + batch * gamma) * vocab_size * 4 + sampled_logits_bytes(rows, vocab_size, dtype)


def tree_speculation_bytes(vocab_size: int, width: int, depth: int, batch: int, context: int,
                           dtype: torch.dtype = torch.float32) -> int:
    """Tree speculation's buffers (engine/spec_tree_step.py) for `batch` sequences of up to `context` tokens, a W,D
    tree of N = W x D + 1 nodes each (with the root), in rows of V float32 per sequence, the largest of:
    - greedy: the verification logits (N rows) and a draft level's (W rows); argmax picks make no softmax copy
      (counting one put `fit` 2.2 MiB over the measured peak of memfit-tiny at 8 x 192 with a 4,3 tree);
    - sampled (engine/spec_tree_sample.py), verifying: the logits (N) and the draft's distributions kept at every
      node with children (1 + W(D - 1)); the target's are made one row at a time (a row and the sampler's scratch
      for it, `sampler_scratch_bytes`, for the whole batch);
    - sampled, drafting the last level: the distributions kept before it (1 + W(D - 2)), the level's logits (W) and
      its distributions with a working copy (2W).
    plus the ancestor mask (N^2 bool) and the attention mask over the context (N x (context + N) bool). An engine
    cannot know which requests will come, so the largest is reserved; W = 1 rows run as chains of depth D
    (speculation_bytes, with copies), so the larger of the two is."""
    n = width * depth + 1
    rows = max(n + width, n + 1 + width * (depth - 1), 1 + width * (depth + 1) if depth > 1 else 0)
    # the target's distributions, one row at a time: the row made and the sampler's scratch for it
    tree = batch * (rows * vocab_size * 4 + n * n + n * (context + n)) + vocab_size * 4 + sampler_scratch_bytes(1, vocab_size)
    return max(tree, speculation_bytes(vocab_size, depth, batch, dtype))


def tokenizer_bytes(model_dir: str | Path | None) -> int:
    """The tokenizer's in-memory tables, estimated as TOKENIZER_BYTES_PER_FILE_BYTE x the size of
    tokenizer.json (its vocabulary and merges are held as Rust maps of about that size); 0 without one."""
    if model_dir is None:
        return 0
    path = Path(model_dir) / "tokenizer.json"
    return TOKENIZER_BYTES_PER_FILE_BYTE * path.stat().st_size if path.is_file() else 0


@dataclass
class MemoryPlan:
    """The parts of the ledger, in bytes. `total_bytes` is what the process adds after torch and memfit
    are imported; the import itself is `runtime_baseline_bytes` (reported beside it, not part of it)."""

    weights_bytes: int
    tokenizer_bytes: int
    runtime_bytes: int
    step_bytes: int
    kv_bytes: int
    runtime_baseline_bytes: int = 0
    shape_cache_bytes: int = 0
    kernel_counts: dict = field(default_factory=dict)  # behind shape_cache (a draft's dedupe reads it)

    @property
    def fixed_bytes(self) -> int:
        """Everything but the KV cache: what the ledger holds before the first request."""
        return (self.weights_bytes + self.tokenizer_bytes + self.runtime_bytes + self.step_bytes
                + self.shape_cache_bytes)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.kv_bytes
