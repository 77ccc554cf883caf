"""CpuDecodeStack: a whole decode step through every layer in one C++ call (cpu_decode_stack.cpp).

The model runner uses it on a CPU for steps where every scheduled sequence decodes one token, when the
engine holds its weights in one of memfit's matmul kernels (cpu_linear "blocked", or "memfit" = row-major)
over a KV cache it reads in place: the virtual cache (fixed stride per slot) or the paged one (block tables). It runs exactly the kernels the PyTorch path calls op by op (CpuDecodeOps,
BlockedLinear / RowMajorLinear), so the two agree token for token (tested); the gain is the ~170 us per
layer of Python glue it skips. It also runs a few consecutive tokens per sequence (`run(..., counts)`):
speculative decoding's verification of a sequence's last token and its drafts, causal within the chunk, at about
the cost of one decode step. Prefill, mixed steps and everything else stay on the PyTorch path.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from memfit.llm.kernels.build import load_cpu_linear
from memfit.llm.kernels.decode import HEAD_DIMS

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_LAYER_FIELDS = ("ln1", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln2", "wg", "bg", "wu", "bu", "wd", "bd",
                 "kcache", "vcache")
ROW_MAJOR_MAX_ROWS = 2  # the row-major kernel loses to oneDNN beyond this (engine: AUTO_MEMFIT_MAX_SEQS)
BLOCKED_MAX_ROWS = 64  # decode batches; larger steps are padded and bucketed by the runner anyway
# Rows of one call given as short chunks (`run(..., counts)`: speculative verification). Up to this many rows
# the PyTorch path runs these same matmul kernels (BlockedLinear, RowMajorLinear: 64 rows), so the stack
# is the same arithmetic without the per-layer glue, whichever kernel holds the weights.
CHUNK_MAX_ROWS = 64


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in _LAYER_FIELDS]


class _Step(ctypes.Structure):
    _fields_ = [("M", _I64), ("C", _I64), ("Hq", _I64), ("Hkv", _I64), ("D", _I64), ("I", _I64), ("window", _I64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("nthreads", ctypes.c_int), ("blocked_nb", _I64),
                ("ks", _P), ("vs", _P), ("slots", _P), ("lens", _P), ("cos", _P), ("sin", _P), ("final_norm", _P),
                ("tables", _P), ("ldt", _I64), ("block_size", _I64), ("kv_first", _I64)]


def _linear_tensors(mod: nn.Module, dtype: torch.dtype, nb: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) as the stack's matmul reads them, else None: a BlockedLinear's packed weight when the
    model is blocked (nb > 0), else a plain or row-major linear's contiguous (N, K) weight of `dtype`."""
    from memfit.llm.kernels.blocked import BlockedLinear

    if nb:
        if not isinstance(mod, BlockedLinear) or mod.nb != nb or mod.dtype != dtype:
            return None
        return mod.packed, mod.bias
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if not isinstance(w, torch.Tensor) or w.dtype != dtype or w.dim() != 2 or not w.is_contiguous():
        return None
    if b is not None and not b.is_contiguous():
        return None
    return w, b


def _projections(layer) -> dict[str, nn.Module]:
    """A decoder layer's projections by the stack's names; fused ones (models/fusion.py) stand for q|k|v ("q")
    and gate|up ("g"), and then "k", "v" and "u" are absent (NULL on the C side)."""
    a, m = layer.self_attn, layer.mlp
    out = {"q": a.qkv_proj} if a.qkv_proj is not None else {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}
    out["o"] = a.o_proj
    out.update({"g": m.gate_up_proj} if m.gate_up_proj is not None else {"g": m.gate_proj, "u": m.up_proj})
    out["d"] = m.down_proj
    return out


class CpuDecodeStack:
    """Built once per engine; `run` does one decode step. `unsupported(model, kv)` says why it can't be built."""

    @staticmethod
    def _blocked_nb(model) -> int:
        from memfit.llm.kernels.blocked import BlockedLinear

        q = _projections(model.model.layers[0])["q"] if len(model.model.layers) else None
        return q.nb if isinstance(q, BlockedLinear) else 0

    @staticmethod
    def unsupported(model, kv) -> str | None:
        cfg = model.config
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.bfloat16, torch.float32) or next(model.parameters()).device.type != "cpu":
            return "needs a bf16/fp32 model on the CPU"
        if kv.block_tables:
            bs = kv.pools(0)[0].shape[1]
            if bs <= 0 or bs & (bs - 1):
                return f"the paged cache's block size {bs} is not a power of two"
        elif not kv.fixed_stride:
            return "needs a KV cache it can read in place (sequences at a fixed stride, or block tables)"
        if cfg.head_dim not in HEAD_DIMS or cfg.num_attention_heads // cfg.num_key_value_heads > 64:
            return f"head_dim {cfg.head_dim} is not one of {HEAD_DIMS}"
        if load_cpu_linear() is None:
            return "memfit's CPU kernels are unavailable"
        nb = CpuDecodeStack._blocked_nb(model)
        for layer in model.model.layers:
            if any(_linear_tensors(mod, dtype, nb) is None for mod in _projections(layer).values()):
                return "the linear layers are not all held by one of memfit's matmul kernels"
        return None

    def __init__(self, model, kv) -> None:
        reason = self.unsupported(model, kv)
        if reason is not None:
            raise RuntimeError(f"memfit's CPU decode stack can't run this model: {reason}")
        self.model, self.kv = model, kv
        cfg = model.config
        self.dtype = next(model.parameters()).dtype
        lib = load_cpu_linear()
        self._fn = getattr(lib.cdll, "memfit_decode_stack_" + ("bf16" if self.dtype == torch.bfloat16 else "f32"))
        self._fn.argtypes = [ctypes.POINTER(_Step), ctypes.POINTER(_Layer), ctypes.c_int, _P, _P]
        self._fn.restype = None
        layers = model.model.layers
        nb = self._blocked_nb(model)
        self.max_rows = BLOCKED_MAX_ROWS if nb else ROW_MAJOR_MAX_ROWS
        self.max_chunk_rows = CHUNK_MAX_ROWS
        self._layers = (_Layer * len(layers))()
        self._keep = []  # every tensor whose pointer the C side holds
        for i, layer in enumerate(layers):
            ptrs = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight}
            for key, mod in _projections(layer).items():  # fused: "q" is q|k|v and "g" gate|up; no k, v, u
                ptrs["w" + key], ptrs["b" + key] = _linear_tensors(mod, self.dtype, nb)
            ptrs["kcache"], ptrs["vcache"] = kv.pools(i) if kv.block_tables else kv.strided(i)
            for name, t in ptrs.items():
                if t is not None:
                    t = t if t.is_contiguous() or name.endswith("cache") else t.contiguous()
                    self._keep.append(t)
                    setattr(self._layers[i], name, t.data_ptr())
        kc, vc = kv.pools(0) if kv.block_tables else kv.strided(0)
        self._paged = kv.block_tables
        self._ks = torch.tensor(kc.stride()[:3], dtype=torch.int64)
        self._vs = torch.tensor(vc.stride()[:3], dtype=torch.int64)
        norm = model.model.norm.weight.contiguous()
        self._keep.append(norm)
        s = self._step = _Step()
        s.C, s.Hq, s.Hkv, s.D, s.I = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        s.window, s.eps, s.scale = cfg.sliding_window or 0, cfg.rms_norm_eps, model.scale
        s.ks, s.vs, s.final_norm = self._ks.data_ptr(), self._vs.data_ptr(), norm.data_ptr()
        s.blocked_nb = nb
        s.block_size = kc.shape[1] if self._paged else 0

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, plan, counts: list[int] | None = None) -> torch.Tensor:
        """One decode token per row: input_ids (M,) and the KV manager's plan for the step (it has made room and
        carries each row's length including the new token, `ends`, and its `slots` or `batch_table`)
        -> hidden states (M, C).

        counts: the plan's sequences take counts[i] consecutive rows each (sum = M), their last counts[i] tokens
        in order (speculative verification: the last token and the drafts). Each row then attends to its
        sequence up to and including its own position, with every row's K/V written first (kv_first)."""
        lens = plan.ends
        m = input_ids.shape[0]
        multi = counts is not None and any(c != 1 for c in counts)
        if multi:
            assert sum(counts) == m and len(counts) == len(lens)
            lens = [e - c + 1 + j for e, c in zip(lens, counts) for j in range(c)]  # row by row, ascending
        x = self.model.model.embed_tokens(input_ids).contiguous()  # (M, C)
        positions = torch.tensor(lens, dtype=torch.long) - 1
        cos_t, sin_t = self.model.rotary.tables(x.device, self.dtype)
        cos, sin = cos_t[positions].contiguous(), sin_t[positions].contiguous()  # (M, D)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        out = torch.empty_like(x)
        s = self._step
        s.M, s.nthreads = m, torch.get_num_threads()
        s.kv_first = int(multi)
        if self._paged:
            where = plan.batch_table  # (B, nb) int64, rows contiguous
            if multi:  # each sequence's block-table row, once per row of it: (M, nb)
                where = where.repeat_interleave(torch.tensor(counts), dim=0).contiguous()
            assert where.dtype == torch.int64 and where.stride(1) == 1 and where.shape[0] == m
            s.tables, s.ldt, s.slots = where.data_ptr(), where.stride(0), None
        else:
            slots = [sl for sl, c in zip(plan.slots, counts) for _ in range(c)] if multi else plan.slots
            where = torch.tensor(slots, dtype=torch.int64)
            s.tables, s.slots = None, where.data_ptr()
        s.lens, s.cos, s.sin = lens_t.data_ptr(), cos.data_ptr(), sin.data_ptr()
        self._fn(ctypes.byref(s), self._layers, len(self._layers), x.data_ptr(), out.data_ptr())
        return out
