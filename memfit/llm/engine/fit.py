"""`memfit fit`: predict the memory a model needs for a context length and batch, before loading it.

The prediction is the engine's own ledger (engine/accounting.py), added up for a workload instead of
reserved: weights as the chosen backend holds them, the tokenizer, the runtime's measured share
(engine/calibrate.py), the step reservation (activations, logits, workspace) and the KV cache. `total_bytes`
is what the process adds after torch and memfit are imported; the import itself is `runtime_baseline_bytes`,
reported beside it.

With speculative decoding (`speculative_model`, `num_speculative_tokens` g) it adds what the engine reserves for
the draft (engine/draft.py): its weights (none for a self-draft, which shares the target's), its KV at the
same context, its step reservation, the speculation buffers (`accounting.speculation_bytes`), and the target's
KV for g lookahead tokens per sequence. With a token tree (`speculative_tree` W,D, engine/spec_tree_step.py) the
buffers are the tree's (`accounting.tree_speculation_bytes`: W x D + 1 verification rows and W draft rows of
logits, the ancestor and attention masks, and for sampled requests the draft's and the target's distributions),
the target's KV holds W x D lookahead tokens per sequence and the draft's (D - 1) x W.

With tensor parallelism (`tensor_parallel_size` N, memfit/llm/parallel/) the breakdown is one rank's: the
weights and KV of its shard (H/N heads, Hkv/N KV heads, I/N MLP columns, V/N vocabulary rows; the norms and a
row-parallel projection's bias replicated, `replicated_weights_bytes`), the gathered (S, V) logits in its step,
and its own tokenizer and runtime. Every rank holds that much: N x total in all (with a draft, rank 0's figure: the
draft lives on rank 0 only, and the all-ranks total counts it once).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memfit.llm.engine import arena_accounting, fallback_accounting
from memfit.llm.engine.accounting import (activation_bytes, attention_in_place, draft_step_bytes, kv_cache_bytes,
                                          mlp_row_block, speculation_bytes, tokenizer_bytes, tree_speculation_bytes,
                                          weights_bytes, workspace_bytes)
from memfit.llm.engine.config import DEFAULT_SPECULATIVE_TOKENS
from memfit.llm.models.config import ModelConfig

__all__ = ["FitBreakdown", "activation_bytes", "kv_cache_bytes", "predict", "predict_for_engine"]


@dataclass
class FitBreakdown:
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    workspace_bytes: int
    tokenizer_bytes: int = 0
    runtime_bytes: int = 0
    runtime_baseline_bytes: int = 0  # importing torch and memfit: reported, not part of total_bytes
    runtime_low_bytes: int = 0  # the least the runtime held in a calibration draw (runtime_bytes: the most)
    cpu_linear: str | None = None
    kv_budget_bytes: int | None = None
    memory_limit_bytes: int | None = None
    # speculative decoding (0 without a draft): the draft's weights, KV and step, and the speculation buffers
    draft_weights_bytes: int = 0
    draft_kv_bytes: int = 0
    draft_step_bytes: int = 0
    speculation_bytes: int = 0
    tensor_parallel_size: int = 1  # >1: every figure is one rank's (see the module docstring)
    replicated_weights_bytes: int = 0  # of weights_bytes: what every rank holds in full (norms, row biases)
    shape_cache_bytes: int = 0  # oneDNN's per-shape kernels (fallback_accounting.py; a draft's own shapes too)

    @property
    def speculative_bytes(self) -> int:
        return self.draft_weights_bytes + self.draft_kv_bytes + self.draft_step_bytes + self.speculation_bytes

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes
                + self.tokenizer_bytes + self.runtime_bytes + self.shape_cache_bytes + self.speculative_bytes)

    @property
    def all_ranks_bytes(self) -> int:
        """Over every rank of a tensor-parallel engine: N x this rank's total, the draft (rank 0's only) once."""
        n = self.tensor_parallel_size
        return n * self.total_bytes - (n - 1) * self.speculative_bytes

    @property
    def kv_fits(self) -> bool:
        return self.kv_budget_bytes is None or self.kv_bytes <= self.kv_budget_bytes

    @property
    def fits(self) -> bool:
        return self.kv_fits and (self.memory_limit_bytes is None or self.total_bytes <= self.memory_limit_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, kv_fits=self.kv_fits,
                 speculative_bytes=self.speculative_bytes, all_ranks_bytes=self.all_ranks_bytes)
        return d


def predict(
    cfg: ModelConfig,
    dtype: torch.dtype,
    context_len: int,
    batch: int,
    chunk: int = 512,
    kv_budget: int | None = None,
    memory_limit: int | None = None,
    *,
    cpu_linear: str | None = None,
    device_type: str = "cpu",
    mapped: bool = True,
    model_dir: str | Path | None = None,
    runtime: dict | None = None,
    in_place: bool = False,
    draft: DraftSpec | None = None,
    arena: bool | None = None,
) -> FitBreakdown:
    """The engine's ledger for `batch` sequences of `context_len` tokens, prefilled `chunk` tokens a step.

    cpu_linear: the backend the engine would pick (`memfit.llm.kernels.backends.choose_cpu_linear`); mapped:
    the checkpoint is stored in `dtype`; model_dir: for the tokenizer's size; runtime: `calibrate.runtime_bytes`
    (None: not counted); in_place: memfit's CPU attention kernels run (`accounting.attention_in_place`);
    draft: speculative decoding's draft (`DraftSpec`); arena: the engine's step arena holds a step's intermediates
    (None: where memfit's kernels attend in place on a CPU, as a single-process engine builds it)."""
    if context_len < 1 or batch < 1 or chunk < 1:
        raise ValueError("context length, batch and chunk must be at least 1")
    runtime = runtime or {}
    mlp_block = mlp_row_block(device_type, cpu_linear, dtype)  # the MLP's row block (the target's; a draft's too)
    arena = in_place and device_type == "cpu" and arena_accounting.LEDGER_USES_ARENA if arena is None else arena
    rows = chunk if arena else 0  # the arena holds steps of up to `chunk` tokens (engine/step_arena.py)
    packed = fallback_accounting.pads_rows(cpu_linear, device_type)  # rows padded to oneDNN's buckets
    spec = {}
    if draft is not None:
        d = draft.config
        spec = dict(
            draft_weights_bytes=0 if draft.shares_weights else weights_bytes(d, dtype, cpu_linear, device_type,
                                                                                draft.mapped),
            draft_kv_bytes=kv_cache_bytes(d, dtype, context_len + draft.draft_lookahead, batch),
            draft_step_bytes=draft_step_bytes(cfg, d, dtype, chunk, context_len, batch, in_place, mlp_block, arena,
                                              packed),
            speculation_bytes=(tree_speculation_bytes(d.vocab_size, *draft.tree, batch, context_len, dtype)
                               if draft.tree else speculation_bytes(d.vocab_size, draft.gamma, batch, dtype)),
        )
    lookahead = draft.lookahead if draft is not None else 0  # the target's KV holds the drafts past the context
    drafting = (draft.config, draft.gamma, draft.tree, draft.mapped) if draft is not None else ()
    return FitBreakdown(
        weights_bytes=weights_bytes(cfg, dtype, cpu_linear, device_type, mapped),
        kv_bytes=kv_cache_bytes(cfg, dtype, context_len + lookahead, batch),
        activation_bytes=activation_bytes(cfg, dtype, min(chunk, context_len), context_len, batch, in_place,
                                          mlp_block, rows, packed),
        workspace_bytes=workspace_bytes(cfg, dtype, context_len, batch, in_place),
        tokenizer_bytes=tokenizer_bytes(model_dir),
        runtime_bytes=int(runtime.get("runtime_bytes", 0)),
        runtime_baseline_bytes=int(runtime.get("runtime_baseline_bytes", 0)),
        runtime_low_bytes=int(runtime.get("runtime_low_bytes", 0)),
        cpu_linear=cpu_linear,
        # measured kernels only where the runtime is (a run that measures nothing starts no processes)
        shape_cache_bytes=fallback_accounting.engine_kernels_bytes(cfg, cpu_linear, chunk, device_type, batch, mapped,
                                                                   *drafting, measure=bool(runtime)),
        kv_budget_bytes=kv_budget,
        memory_limit_bytes=memory_limit,
        **spec,
    )


@dataclass
class DraftSpec:
    """What `predict` needs of a speculative draft: its config, g, and how its weights are held."""

    config: ModelConfig
    gamma: int
    shares_weights: bool = False  # a self-draft: the target's own first layers
    mapped: bool = True  # its checkpoint is stored in the engine's dtype
    tree: tuple[int, int] | None = None  # (W, D): tree speculation; g is then D

    @property
    def lookahead(self) -> int:
        """Tokens past the context the target's KV holds in a step: g drafts, or a tree's W x D nodes."""
        return self.tree[0] * self.tree[1] if self.tree else self.gamma

    @property
    def draft_lookahead(self) -> int:
        """Tokens past the context the draft's KV holds: a tree's (D - 1) x W fed nodes (the chain's g - 1 are
        within the prediction's 10%, and left out as before)."""
        return (self.tree[1] - 1) * self.tree[0] if self.tree else 0

    @classmethod
    def resolve(cls, name: str, gamma: int | None, target: ModelConfig, dtype: torch.dtype,
                tree: tuple[int, int] | str | None = None) -> DraftSpec:
        """A bundled name, a directory or self[:N], as `--speculative-model` takes it (engine/draft.py)."""
        import dataclasses

        from memfit.llm.engine.draft import self_draft_layers
        from memfit.llm.models.config import parse_dtype
        from memfit.llm.models.loader import resolve_model_path

        from memfit.llm.engine.spec_tree import parse_tree

        shape = parse_tree(tree)
        if shape is not None and gamma not in (None, shape[1]):
            raise ValueError(f"with a W,D tree the depth D is the number of speculative tokens: {gamma} differs from "
                             f"D = {shape[1]}")
        g = shape[1] if shape else (DEFAULT_SPECULATIVE_TOKENS if gamma is None else gamma)  # 0 is refused below
        if g < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {g}")
        layers = self_draft_layers(name, target.num_hidden_layers)
        if layers is not None:
            return cls(dataclasses.replace(target, num_hidden_layers=layers), g, shares_weights=True, tree=shape)
        cfg = ModelConfig.from_dir(resolve_model_path(name))
        return cls(cfg, g, mapped=parse_dtype(cfg.torch_dtype) == dtype, tree=shape)



def predict_for_engine(model_dir: str | Path, context_len: int, batch: int, chunk: int = 512,
                       dtype: torch.dtype | None = None, cpu_linear: str = "auto", prepack: bool = True,
                       cpu_kernels: bool = True, device: str = "cpu", measure_runtime: bool = True,
                       kv_budget: int | None = None, memory_limit: int | None = None,
                       speculative_model: str | None = None, num_speculative_tokens: int | None = None,
                       tensor_parallel_size: int = 1,
                       speculative_tree: tuple[int, int] | str | None = None) -> FitBreakdown:
    """`predict` with the choices an engine would make for this model directory and options; with
    tensor_parallel_size N > 1, one rank's share."""
    from memfit.llm.kernels.backends import BackendOptions, choose_cpu_linear
    from memfit.llm.models.config import parse_dtype
    from memfit.llm.models.loader import resolve_model_path

    if tensor_parallel_size < 1:  # 0 or -3 printed the one-process breakdown, labelled tensor_parallel_size 1
        raise ValueError(f"--tensor-parallel-size must be at least 1 (got {tensor_parallel_size})")
    model_dir = resolve_model_path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    stored = parse_dtype(cfg.torch_dtype)
    dtype = dtype or stored
    dev = torch.device(device)
    linear = choose_cpu_linear(BackendOptions(max_num_seqs=batch, prepack=prepack, cpu_linear=cpu_linear,
                                              cpu_kernels=cpu_kernels), dev, dtype)
    runtime = None
    if measure_runtime:
        from memfit.llm.engine.calibrate import runtime_bytes

        runtime = runtime_bytes(dev.type, str(dtype).removeprefix("torch."), linear, cpu_kernels and dev.type == "cpu",
                                batch=batch)
    if speculative_tree is not None and speculative_model is None:
        raise ValueError("--tree needs --speculative-model: the draft that proposes the tree")
    draft = (DraftSpec.resolve(speculative_model, num_speculative_tokens, cfg, dtype, speculative_tree)
             if speculative_model is not None else None)
    if tensor_parallel_size > 1:
        if draft is not None and draft.shares_weights:
            raise ValueError("a self-draft (--speculative-model self[:N]) does not run under --tensor-parallel-size "
                             "> 1: its layers are sharded over the ranks; use a separate draft model")
        return _predict_rank(cfg, dtype, context_len, batch, chunk, kv_budget, memory_limit, linear, dev.type,
                             model_dir, runtime, attention_in_place(dev.type, dtype, cpu_kernels), tensor_parallel_size,
                             draft)
    return predict(cfg, dtype, context_len, batch, chunk, kv_budget, memory_limit, cpu_linear=linear,
                   device_type=dev.type, mapped=stored == dtype, model_dir=model_dir, runtime=runtime,
                   in_place=attention_in_place(dev.type, dtype, cpu_kernels), draft=draft)


def _predict_rank(cfg: ModelConfig, dtype: torch.dtype, context_len: int, batch: int, chunk: int,
                  kv_budget: int | None, memory_limit: int | None, linear: str | None, device_type: str,
                  model_dir: Path, runtime: dict | None, in_place: bool, world: int,
                  draft: DraftSpec | None = None) -> FitBreakdown:
    """One rank's breakdown at tensor-parallel size `world` (its shard's config; slices are copies, never
    views of the mapped file; the logits it samples from are gathered to the full vocabulary). With a draft:
    rank 0's, which holds the whole draft (the other ranks hold none of it)."""
    import dataclasses

    from memfit.llm.parallel.shard import shard_config

    rank_cfg = shard_config(cfg, world)
    b = predict(rank_cfg, dtype, context_len, batch, chunk, kv_budget, memory_limit, cpu_linear=linear,
                device_type=device_type, mapped=False, model_dir=model_dir, runtime=runtime, in_place=in_place,
                draft=draft, arena=False)  # no step arena under tensor parallelism
    full_vocab = dataclasses.replace(rank_cfg, vocab_size=cfg.vocab_size)
    b.activation_bytes = activation_bytes(full_vocab, dtype, min(chunk, context_len), context_len, batch, in_place,
                                          packed=fallback_accounting.pads_rows(linear, device_type))
    itemsize = torch.empty((), dtype=dtype).element_size()
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    row_biases = (h if cfg.attention_bias else 0) + (h if cfg.mlp_bias else 0)
    b.replicated_weights_bytes = ((2 * layers + 1) * h + layers * row_biases) * itemsize  # norms, row biases
    b.tensor_parallel_size = world
    return b

