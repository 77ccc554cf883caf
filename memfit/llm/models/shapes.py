"""The matrix shapes of a Llama-family model's linear layers, from its config alone (no weights loaded): what the
memory accounting counts per matrix and what oneDNN's kernel measurement packs."""
from __future__ import annotations

from memfit.llm.models.config import ModelConfig


def linear_shapes(cfg: ModelConfig, fused: bool) -> list[tuple[int, int]]:
    """(out, in) of every linear layer, decoder layers first, then the head."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = [(q + 2 * kv, h)] if fused else [(q, h), (kv, h), (kv, h)]
    mlp = [(2 * i, h)] if fused else [(i, h), (i, h)]
    per_layer = attn + [(h, q)] + mlp + [(h, i)]
    return per_layer * cfg.num_hidden_layers + [(cfg.vocab_size, h)]
