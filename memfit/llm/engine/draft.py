"""The draft model of speculative decoding: checked against the target, reserved in the ledger, loaded.

`speculative_model` is a bundled model's name, a model directory, or `self` / `self:N`: a self-draft, the
target's own first N layers (default: half of them) followed by its final norm and head. A self-draft shares
every weight with the target (no weight memory of its own), for models that have no draft; it agrees with the
target only as well as the model's early layers predict its output (LayerSkip-style models train for that).

    draft = Draft.load(engine, backend_options)     # before the target's KV share is carved out
    decoder = draft.decoder(engine)                 # once the target's runner exists

Order matters for the memory ledger: the draft's weights and its share of the KV memory are reserved before
the target's KV cache takes what is left, so the two caches split the room in proportion to their bytes per
token (each can hold as many tokens as the other) and neither is starved by the other's defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import nn

from memfit.llm.engine import accounting, arena_accounting, fallback_accounting
from memfit.llm.engine.runner import ModelRunner
from memfit.llm.engine.spec_decode import SpecDecoder
from memfit.llm.kernels.backends import BackendOptions, choose_cpu_linear, prepare_model
from memfit.llm.kv import KVLayout, create_kv_cache, kv_cache_class
from memfit.llm.models.config import ModelConfig, parse_dtype
from memfit.llm.models.llama import LlamaForCausalLM, LlamaModel
from memfit.llm.models.loader import load_model, resolve_model_path
from memfit.llm.models.tokenizer import Tokenizer
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, Tier, format_bytes, resolve_budget


class TargetEngine(Protocol):
    """What the draft reads of the engine it serves (LLMEngine; a protocol, so this module does not import it)."""

    config: Any
    dtype: torch.dtype
    device: torch.device
    model: LlamaForCausalLM
    model_config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int
    ledger: MemoryBudget
    backends: Any
    layout: Any
    runner: ModelRunner
    memory_plan: accounting.MemoryPlan  # the target's ledger parts (its oneDNN kernels, for the draft's dedupe)
    tp: Any  # tensor parallelism's rank (None: a single process)


class SpeculativeConfigError(ValueError):
    """The draft cannot serve this target (another vocabulary or tokenizer), or a bad speculative option."""


def check_compatible(target_cfg: ModelConfig, target_tok: Tokenizer, draft_cfg: ModelConfig, draft_tok: Tokenizer,
                     draft_name: str) -> None:
    """Refuse a draft whose token ids would mean other tokens than the target's: speculation compares the two
    models' distributions id by id, so both must share one vocabulary, token for token."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise SpeculativeConfigError(
            f"the draft model {draft_name!r} has a vocabulary of {draft_cfg.vocab_size} tokens but the target has "
            f"{target_cfg.vocab_size}: a draft must use the target's tokenizer")
    if draft_tok.vocab_size != target_tok.vocab_size:
        raise SpeculativeConfigError(
            f"the draft model {draft_name!r}'s tokenizer has {draft_tok.vocab_size} tokens, the target's "
            f"{target_tok.vocab_size}: a draft must use the target's tokenizer")
    for i in range(target_tok.vocab_size):
        if draft_tok.id_to_token(i) != target_tok.id_to_token(i):
            raise SpeculativeConfigError(
                f"the draft model {draft_name!r}'s tokenizer differs from the target's (token id {i} is "
                f"{draft_tok.id_to_token(i)!r} in the draft, {target_tok.id_to_token(i)!r} in the target): a draft "
                "must use the target's tokenizer")


def self_draft_layers(name: str, num_layers: int) -> int | None:
    """N for `self` / `self:N` (None for any other name); N outside 1 .. num_layers is refused (N = num_layers is
    the target itself: every draft is accepted, a check of the machinery, never faster)."""
    if name != "self" and not name.startswith("self:"):
        return None
    if name == "self":
        return max(1, num_layers // 2)
    try:
        n = int(name.removeprefix("self:"))
    except ValueError:
        n = 0
    if not 1 <= n <= num_layers:
        raise SpeculativeConfigError(
            f"speculative_model {name!r}: a self-draft takes 1 to {num_layers} of the target's {num_layers} "
            "layers, written self:N (or `self` for half of them)")
    return n


def self_draft(target: LlamaForCausalLM, n: int) -> LlamaForCausalLM:
    """The target's first n layers, its final norm and head as a model of their own: the same modules (as
    prepared: fused, packed), so no weight is copied. Layer i keeps its index: a draft cache of n layers fits."""
    body = LlamaModel.__new__(LlamaModel)
    nn.Module.__init__(body)
    body.embed_tokens, body.norm = target.model.embed_tokens, target.model.norm
    body.layers = nn.ModuleList(list(target.model.layers)[:n])
    draft = LlamaForCausalLM.__new__(LlamaForCausalLM)
    nn.Module.__init__(draft)
    draft.config = dataclasses.replace(target.config, num_hidden_layers=n)
    draft.model, draft.rotary, draft.lm_head = body, target.rotary, target.lm_head
    draft.scale, draft.ops = target.scale, target.ops
    return draft


def _kv_options(cfg: Any) -> dict[str, Any]:
    """The draft cache's constructor options: the engine's kind and layout, no prefix caching of its own."""
    return kv_cache_class(cfg.kv_cache).engine_options(
        max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size, kv_layout=cfg.kv_layout,
        prefault=cfg.kv_prefault, eager_pages=cfg.kv_eager_pages)


class Draft:
    def __init__(self, model, config: ModelConfig, layout: KVLayout, kv_budget: MemoryBudget, backends) -> None:
        self.model = model
        self.backends = backends  # kernels/backends.py's choices for it (the decode stack)
        self.config = config
        self.layout = layout
        self.kv_budget = kv_budget

    @classmethod
    def load(cls, engine: TargetEngine, options: BackendOptions) -> Draft:
        cfg = engine.config
        name = str(cfg.speculative_model)
        dtype, device = engine.dtype, engine.device
        layers = self_draft_layers(name, engine.model_config.num_hidden_layers)
        if layers is not None:  # shares the target's weights: nothing to check, load or reserve for them
            path, stored, weights = None, dataclasses.replace(engine.model_config, num_hidden_layers=layers), 0
        else:
            path = resolve_model_path(name)
            stored = ModelConfig.from_dir(path)
            check_compatible(engine.model_config, engine.tokenizer, stored, Tokenizer.from_dir(path), name)
            cpu_linear = choose_cpu_linear(options, device, dtype)
            weights = accounting.weights_bytes(stored, dtype, cpu_linear, device.type,
                                               mapped=str(dtype).removeprefix("torch.") == stored.torch_dtype)
        gamma = cfg.num_speculative_tokens or 1
        tree = cfg.speculative_tree
        buffers = (accounting.tree_speculation_bytes(stored.vocab_size, *tree, cfg.max_num_seqs, engine.max_model_len,
                                                     dtype)
                   if tree else accounting.speculation_bytes(stored.vocab_size, gamma, cfg.max_num_seqs, dtype))
        step = accounting.draft_step_bytes(engine.model_config, stored, dtype, cfg.max_num_batched_tokens,
                                           engine.max_model_len, cfg.max_num_seqs,
                                           accounting.attention_in_place(device.type, dtype, options.cpu_kernels),
                                           accounting.mlp_row_block(device.type,
                                                                    choose_cpu_linear(options, device, dtype), dtype),
                                           # the step arena the two models share; oneDNN's row padding
                                           arena=engine.tp is None and arena_accounting.LEDGER_USES_ARENA,
                                           packed=fallback_accounting.pads_rows(choose_cpu_linear(options, device, dtype),
                                                                              device.type))
        # oneDNN's kernels for the draft's matrix shapes and head rows the target's lack (none for a self-draft)
        options = dataclasses.replace(options, head_rows=fallback_accounting.head_rows(cfg.max_num_seqs, tree=tree,
                                                                                       draft=True))
        shapes = 0 if path is None else fallback_accounting.shape_cache_bytes(  # a self-draft runs the target's modules
            stored, choose_cpu_linear(options, device, dtype), cfg.max_num_batched_tokens, device.type,
            engine.memory_plan.kernel_counts, cfg.memory_budget is not None, options.head_rows,
            mapped=parse_dtype(stored.torch_dtype) == dtype, fused=options.fuse)  # loaded whole, even under TP
        need = weights + buffers + step + shapes
        if need + 4096 > engine.ledger.available_bytes:
            what = f"a {tree[0]},{tree[1]} tree's buffers" if tree else "speculation buffers"
            lower = "lower --speculative-tree" if tree else "lower --num-speculative-tokens"
            raise MemoryBudgetExceeded(
                f"the draft model {name!r} needs {format_bytes(need)} (weights {format_bytes(weights)}, step "
                f"{format_bytes(step)}, {what} {format_bytes(buffers)}, oneDNN kernels {format_bytes(shapes)}) "
                "but the memory budget has "
                f"{format_bytes(engine.ledger.available_bytes)} left after the target; raise --memory-budget or "
                f"{lower} / --max-num-seqs")
        engine.ledger.reserve(weights, "draft_weights")
        engine.ledger.reserve(step + buffers, "draft_step")
        if shapes:
            engine.ledger.reserve(shapes, "shape_cache")
        if path is None:
            model, mc, backends = self_draft(engine.model, layers), stored, engine.backends  # type: ignore[arg-type]
        else:
            model, mc = load_model(path, dtype=dtype, device=device)
            backends = prepare_model(model, options, device)
        max_len = min(engine.max_model_len, mc.max_position_embeddings)
        model.rotary.limit(max_len)  # a self-draft's tables are the target's, limited alike
        layout = KVLayout(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, dtype, max_len, device)
        # Its KV share: the draft's bytes-per-token fraction of what is left, so both caches hold as many tokens.
        target_bpt = engine.layout.bytes_per_token
        left = engine.ledger.available_bytes
        cap = kv_cache_class(cfg.kv_cache).all_slots_bytes(layout, cfg.max_num_seqs, **_kv_options(cfg))
        share = min(cap, left * layout.bytes_per_token // (layout.bytes_per_token + target_bpt))
        if cfg.kv_budget is not None:
            # --kv-budget caps the target's share; the draft drafts only for sequences the target holds, so it
            # needs no more tokens than that cap: without this its share was a fraction of the whole ledger
            # (17x the target's tokens under a small --kv-budget), held by nothing it could use
            target_cap = resolve_budget(cfg.kv_budget, Tier.DEVICE, str(device))
            share = min(share, target_cap * layout.bytes_per_token // target_bpt)
        budget = MemoryBudget(max(1, share), Tier.DEVICE, name="draft_kv_budget", parent=engine.ledger)
        return cls(model, mc, layout, budget, backends)

    def decoder(self, engine: TargetEngine) -> SpecDecoder:
        """The draft's KV cache (the engine's kind, its own budget) and runner, and the decoder using both."""
        cfg = engine.config
        kv = create_kv_cache(cfg.kv_cache, self.layout, self.kv_budget, **_kv_options(cfg))
        runner = ModelRunner(self.model, kv, engine.device)
        runner.scratch = engine.runner.scratch  # one step arena for both models (they never run at once)
        runner.stack = self.backends.decode_stack(self.model, kv)  # the draft's one-token passes in one C++ call
        return SpecDecoder(engine.runner, runner, int(cfg.num_speculative_tokens), cfg.max_num_batched_tokens,
                           adaptive=cfg.speculative_adaptive, tree=cfg.speculative_tree)
