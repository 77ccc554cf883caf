"""One config-driven Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral).

Module and parameter names follow Hugging Face's exactly (`model.layers.0.self_attn.q_proj.weight`, ...)
so a checkpoint's safetensors load onto it key for key, with no renaming table.

All tokens of a step are flattened into one dimension N (several sequences, prefill chunks and decode
tokens together, as in nano-vllm); attention is delegated to an `AttentionBackend` (memfit.llm.kernels.attention).
"""
from __future__ import annotations

import torch
from torch import nn

from memfit.llm.kernels import large_m
from memfit.llm.kernels.attention import AttentionBackend, DenseCausalAttention
from memfit.llm.models.config import ModelConfig, rope_inv_freq
from memfit.llm.models.ops import TORCH_OPS, TorchOps
from memfit.llm.kernels.scratch_layout import ATTN_OUT, HIDDEN, NORMED, RESIDUAL, WORK
from memfit.memory import scratch


def _linear(mod: nn.Module, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """mod(x), written into `out` where the module takes an output (memfit's BlockedLinear); else as usual."""
    return mod(x, out=out) if out is not None and getattr(mod, "takes_out", False) else mod(x)


def _norm_out(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The step arena's (residual, normed) regions for a fused add + norm of x (N, C); None outside a step."""
    if scratch.active() is None or x.dim() != 2:
        return None
    return scratch.take(RESIDUAL, tuple(x.shape), x.dtype), scratch.take(NORMED, tuple(x.shape), x.dtype)


class RMSNorm(nn.Module):
    ops: TorchOps = TORCH_OPS  # swapped per model by memfit.llm.models.ops users (see set_ops)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.add_rms_norm(x, None, self.weight, self.eps)[1]

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, RMSNorm(residual + x)): the pre-norm block's residual add fused with its norm. In a step
        arena the residual stream is updated in place and the norm goes to the NORMED region."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, _norm_out(x))


class RotaryEmbedding(nn.Module):
    """cos/sin tables (max_pos, head_dim) computed once; looked up by absolute position, once per forward
    pass (`at`), since every layer rotates the same positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_positions = cfg.max_position_embeddings  # rows kept (`limit`): an engine's max_model_len
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def limit(self, max_positions: int) -> None:
        """Keep tables for positions below `max_positions` only (an engine never runs past its max_model_len):
        2 x P x D values, 0.5 MiB for memfit-large's 2048 positions in float32, 112 KiB at 448."""
        self.max_positions = max(1, min(max_positions, self.cfg.max_position_embeddings))
        self.cos = self.sin = None

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (P, D). The sign of rotate-half is folded into the sine table,
        sin_signed = [-sin, sin] per half, so a rotation is x * cos + x.roll(D/2) * sin_signed."""
        if self.cos is None or self.cos.device != device or self.cos.dtype != dtype:
            inv_freq = rope_inv_freq(self.cfg).to(device)  # (D/2,)
            # Computed for every position and cut after, so a row has the same bits whatever the limit (the
            # vectorised cos/sin may round a tail element its own way).
            t = torch.arange(self.cfg.max_position_embeddings, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)  # (Pmax, D/2)
            p = self.max_positions
            self.cos = torch.cat((freqs, freqs), dim=-1).cos().to(dtype)[:p].clone()  # (P, D)
            self.sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(dtype)[:p].clone()
        return self.cos, self.sin

    def at(self, positions: torch.Tensor, dtype: torch.dtype, ops: TorchOps = TORCH_OPS) -> RopeAt:
        cos_t, sin_t = self.tables(positions.device, dtype)
        return RopeAt(cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1), ops)  # (N, 1, D) each


class RopeAt:
    """The rotation for one step's positions; `apply(q, k)` rotates (N, H, D) queries and keys."""

    def __init__(self, cos: torch.Tensor, sin_signed: torch.Tensor, ops: TorchOps = TORCH_OPS) -> None:
        self.cos, self.sin, self.ops = cos, sin_signed, ops

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rope(q, k, self.cos, self.sin)

    def fused(self, qkv_proj: nn.Module, x: torch.Tensor, out: torch.Tensor | None, rot_cols: int) -> torch.Tensor | None:
        """qkv_proj(x) with its first `rot_cols` columns (q's and k's heads of 64) rotated in the matmul's store, where
        the ops allow it (ops.fuses_rope: the same bits as apply) and the projection can (BlockedLinear.rope_rows);
        None, having computed nothing, elsewhere. x: (N, C) -> (N, q + 2 kv)."""
        fn = getattr(qkv_proj, "rope_rows", None)
        if fn is None or not self.ops.fuses_rope or x.dim() != 2:
            return None
        return fn(x, out, self.cos.view(-1, self.cos.shape[-1]), self.sin.view(-1, self.sin.shape[-1]), rot_cols)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one matmul (models/fusion.py replaces the three)

    def forward(self, x: torch.Tensor, rope: RopeAt, attn: AttentionBackend) -> torch.Tensor:
        n = x.shape[0]
        if self.qkv_proj is not None:
            dq, dkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            work = scratch.take(WORK, (n, dq + 2 * dkv), x.dtype)
            qkv = rope.fused(self.qkv_proj, x, work, dq + dkv) if self.head_dim == 64 else None
            if qkv is not None:  # q and k rotated in the matmul's store (BlockedLinear.rope_rows)
                q, k, v = qkv.split([dq, dkv, dkv], dim=-1)
                out = attn(self.layer_idx, q.view(n, self.n_heads, self.head_dim), k.view(n, self.n_kv, self.head_dim),
                           v.view(n, self.n_kv, self.head_dim))
                return _linear(self.o_proj, out.reshape(n, self.n_heads * self.head_dim),
                               scratch.take(HIDDEN, (n, x.shape[-1]), x.dtype))
            qkv = _linear(self.qkv_proj, x, work)  # (N, dq + 2 dkv)
            q, k, v = qkv.split([dq, dkv, dkv], dim=-1)  # column slices
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.n_heads, self.head_dim)  # (N, Hq, D)
        k = k.view(n, self.n_kv, self.head_dim)  # (N, Hkv, D)
        v = v.view(n, self.n_kv, self.head_dim)
        q, k = rope.apply(q, k)
        out = attn(self.layer_idx, q, k, v)  # (N, Hq, D), in the ATTN_OUT region in a step arena
        return _linear(self.o_proj, out.reshape(n, self.n_heads * self.head_dim),
                       scratch.take(HIDDEN, (n, x.shape[-1]), x.dtype))  # (N, C): C in, C out


class MLP(nn.Module):
    ops: TorchOps = TORCH_OPS
    # Steps of 2 x row_block rows or more run in blocks of row_block rows (the last takes the rest), so the
    # (rows, 2I) gate/up output and the (rows, I) product exist for one block at a time, not for a whole prefill
    # chunk (3 x I values a row: 3.4 MiB for a 192-row step of memfit-large in float32, 1.1 MiB per 64-row block).
    # 0: the whole step at once. Set by the backend (kernels/backends.py) only where each row's result does not
    # depend on how many rows a call has, so blocking changes no bit.
    row_block: int = 0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul (see models/fusion.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.row_block
        n = x.shape[0]
        # In a step arena the output goes to the HIDDEN region (o_proj's output there was read by the norm before
        # this runs), each block's rows written in place.
        out = scratch.take(HIDDEN, (n, x.shape[-1]), x.dtype) if x.dim() == 2 else None  # (N, C): C in, C out
        if not b or x.dim() != 2 or n < 2 * b:
            return self._rows(x, out)
        arena = out is not None
        if not arena:  # each block's output made, then copied in (accounting.mlp_bytes counts it)
            out = x.new_empty(n, self.down_proj.out_features)  # (N, C)
        last = n - n % b - b  # whole blocks but the last, which takes the b..2b-1 rows left
        for lo, hi in [(lo, lo + b) for lo in range(0, last, b)] + [(last, n)]:
            with large_m.rows_from(lo):  # which of the block's rows are a mixed step's decode rows
                if arena:
                    self._rows(x[lo:hi], out[lo:hi])
                else:
                    out[lo:hi] = self._rows(x[lo:hi])
        return out

    def _rows(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """down(SiLU(gate(x)) * up(x)) for x (M, C), written into `out` (M, C) when given; returns the result."""
        act_out = None
        if self.gate_up_proj is not None:
            work = (scratch.take(WORK, (x.shape[0], self.gate_up_proj.out_features), x.dtype)
                    if x.dim() == 2 and scratch.active() is not None else None)
            fused = getattr(self.gate_up_proj, "silu_mul_rows", None)  # memfit's BlockedLinear: AMX prefill rows
            act = fused(x, work) if fused is not None and self.ops.fuses_silu_mul else None  # (M, I) or None
            if act is not None:
                y = _linear(self.down_proj, act, out)  # (M, C)
                if out is not None and y.data_ptr() != out.data_ptr():
                    out.copy_(y)
                    return out
                return y
            both = _linear(self.gate_up_proj, x, work)  # (M, 2I)
            gate, up = both.chunk(2, dim=-1)  # (M, I) each, row stride 2I
            if work is not None and both.data_ptr() == work.data_ptr():
                act_out = gate  # in the arena: the product overwrites the gate half, element by element
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = _linear(self.down_proj, self.ops.silu_mul(gate, up, act_out), out)  # (M, C)
        if out is not None and y.data_ptr() != out.data_ptr():
            out.copy_(y)
            return out
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeAt,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block, with the residual stream carried beside the block output (as vLLM does) so each
        residual add fuses with the norm that follows it: returns (block output, residual before it)."""
        residual, h = self.input_layernorm.add(x, residual)  # residual += x (x alone at layer 0)
        # (in a step arena: residual in RESIDUAL, h in NORMED, the block outputs in HIDDEN; scratch_layout.py)
        residual, h = self.post_attention_layernorm.add(self.self_attn(h, rope, attn), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM. `forward` returns final hidden states; `compute_logits` projects them, so
    a runner can project only the positions it samples from."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.scale = cfg.head_dim**-0.5
        self.ops: TorchOps = TORCH_OPS

    def set_ops(self, ops: TorchOps) -> None:
        """Run the element-wise math through `ops` (e.g. memfit's CPU kernels, memfit.llm.kernels.decode)."""
        self.ops = ops
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP)):
                m.ops = ops

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: (N,) -> hidden states (N, hidden); with `rows` (S,), those rows' only, (S, hidden),
        in fresh memory (outside the step arena). The final residual add + RMSNorm is row by row, so taking the rows
        first gives the same bits for S of the N rows' work (a 32-prompt, 4096-token prefill samples 32 rows)."""
        x = self.model.embed_tokens(input_ids)  # (N, C)
        rope = self.rotary.at(positions, x.dtype, self.ops)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, attn)
        if rows is None:
            return self.model.norm.add(x, residual)[1]
        if not len(rows):
            return x.new_empty((0, x.shape[-1]))
        x = x.index_select(0, rows)  # (S, C)
        residual = None if residual is None else residual.index_select(0, rows)  # (S, C)
        norm = self.model.norm  # no out hints: the (S, C) result is not an arena region the next step reuses
        return norm.ops.add_rms_norm(x, residual, norm.weight, norm.eps)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (N, V)

    def dense_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without a cache. input_ids (B, T) -> logits (B, T, V)."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).repeat(b)  # (B*T,)
        attn = DenseCausalAttention([t] * b, self.scale, self.config.sliding_window)
        hidden = self.forward(input_ids.reshape(-1), positions, attn)
        return self.compute_logits(hidden).view(b, t, -1)
