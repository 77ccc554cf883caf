"""Kernel families and the shape distributions they are drawn from.

Shapes come from the operators of real networks (BERT-base and ViT-S linear layers and attention, ResNet and
MobileNet convolutions, classifier heads) mixed with log-uniform draws, so the model sees both the common
shapes and odd ones. Sizes are capped so a kernel runs in about 1 us to a few ms on one core: labelling time
on a small machine is the scarce resource."""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field

from memfit.plan.cost import kernels, norms

FAMILIES = ("matmul", "batch_matmul", "conv", "elementwise", "reduction", "softmax", "layernorm", "fused")
# f32 matmuls compiled with each candidate vector tile (m, n, k) through a lowering config, and with IREE's
# default (tile None): the dataset of the in-the-loop ranking (memfit.plan.cost.tune)
TUNED = "tuned_matmul"
# IREE rejects a vector of 32 KiB on an AVX-512 host (16x32x16: 19 of the 20 compile) and of 16 KiB on an AVX2
# host (also 8x32x16, 16x16x16, 4x64x16); their k=8 halves keep 16 candidates compiling there
TILES = tuple((m, n, k) for m, n in ((1, 16), (2, 32), (4, 16), (8, 16), (8, 32), (16, 16), (4, 64), (16, 32))
              for k in (1, 16)) + ((2, 16, 16), (8, 32, 8), (16, 16, 8), (4, 64, 8))
DTYPES = ("f32", "bf16", "i8")
FLOAT_ONLY = ("softmax", "layernorm")
MAX_FLOPS = 1.2e8   # ~1 ms of f32 matmul on one AVX-512 core
MAX_ELEMS = 1 << 21  # 8 MiB of f32 per tensor

TOKENS = (1, 8, 16, 32, 49, 64, 128, 196, 197, 256, 384, 512)
HIDDEN = (64, 96, 128, 192, 256, 320, 384, 512, 576, 768, 1000, 1024, 1280, 1536, 2048, 3072)
CHANNELS = (3, 16, 24, 32, 40, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
SPATIAL = (7, 14, 28, 56, 112)
SEQ = (32, 64, 128, 197, 256)
HEAD_DIM = (32, 64)
UNARY_WEIGHTS = {"relu": 3, "exp": 1, "tanh": 1, "sigmoid": 1, "gelu": 2, "sqrt_abs": 1, "scale": 2, "neg": 1}


@dataclass(frozen=True)
class KernelSpec:
    """One generated kernel: its family, element type and the parameters its emitter takes."""

    family: str
    dtype: str
    params: dict = field(hash=False)

    def shape_key(self) -> str:
        """Identifies the kernel's shape whatever its dtype: the held-out-shapes split keeps every dtype of a
        shape on the same side."""
        shape = {k: v for k, v in sorted(self.params.items()) if k not in ("ops", "act", "kind_ops", "tile")}
        return self.family + ":" + json.dumps(shape, sort_keys=True)

    def mlir(self) -> str:
        return render(self)

    def key(self) -> str:
        return hashlib.sha1(self.mlir().encode()).hexdigest()[:16]


def render(spec: KernelSpec) -> str:
    p, dt = spec.params, spec.dtype
    if spec.family in ("matmul", "batch_matmul", TUNED):
        return kernels.contraction("matmul" if spec.family == TUNED else spec.family, dt, p)
    if spec.family == "conv":
        return kernels.contraction(p["kind"], dt, p)
    if spec.family == "elementwise":
        return kernels.elementwise(dt, p["shape"], p["ops"], p["fused"])
    if spec.family == "reduction":
        return kernels.reduction(dt, p["shape"], p["axes"], p["kind"])
    if spec.family == "softmax":
        return norms.softmax(dt, p["shape"])
    if spec.family == "layernorm":
        return norms.layernorm(dt, p["shape"])
    if spec.family == "fused":
        if p["kind"] == "attention":
            return norms.attention_scores(dt, p)
        base = "matmul" if p["kind"] == "matmul_epilogue" else p["conv"]
        return kernels.contraction(base, dt, p, p["ops"])
    raise ValueError(f"unknown family {spec.family!r}")


def _dim(rng: random.Random, pool: tuple[int, ...], lo: int, hi: int, p_pool: float = 0.7) -> int:
    """A size from a real network's pool, or log-uniform in [lo, hi] (odd sizes the pools miss)."""
    if rng.random() < p_pool:
        return rng.choice(pool)
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _shrink(dims: dict, keys: tuple[str, ...], cost, cap: float) -> dict:
    """Halve the named dims in turn (largest first) until cost(dims) <= cap."""
    while cost(dims) > cap:
        k = max(keys, key=lambda k: dims[k])
        if dims[k] <= 1:
            break
        dims[k] = max(1, dims[k] // 2)
    return dims


def _matmul(rng: random.Random) -> dict:
    d = {"M": _dim(rng, TOKENS, 1, 1024), "K": _dim(rng, HIDDEN, 8, 4096), "N": _dim(rng, HIDDEN, 8, 4096)}
    return _shrink(d, ("M", "K", "N"), lambda d: 2 * d["M"] * d["K"] * d["N"], MAX_FLOPS)


def _bmm(rng: random.Random) -> dict:
    seq = _dim(rng, SEQ, 8, 512)
    if rng.random() < 0.5:  # Q K^T
        d = {"B": rng.choice((1, 4, 8, 12)), "M": seq, "K": _dim(rng, HEAD_DIM, 8, 128), "N": seq}
    else:  # P V
        d = {"B": rng.choice((1, 4, 8, 12)), "M": seq, "K": seq, "N": _dim(rng, HEAD_DIM, 8, 128)}
    return _shrink(d, ("B", "M", "K", "N"), lambda d: 2 * d["B"] * d["M"] * d["K"] * d["N"], MAX_FLOPS)


def _conv(rng: random.Random) -> dict:
    kind = rng.choices(("conv_nhwc", "conv_nchw", "depthwise"), (3, 2, 2))[0]
    d = {"kind": kind, "N": rng.choice((1, 1, 1, 2)), "C": _dim(rng, CHANNELS, 3, 512),
         "F": _dim(rng, CHANNELS, 8, 512), "KH": rng.choices((1, 3, 5, 7), (3, 5, 1, 1))[0],
         "stride": rng.choices((1, 2), (3, 1))[0], "dilation": rng.choices((1, 2), (6, 1))[0],
         "OH": _dim(rng, SPATIAL, 4, 112)}
    if kind == "depthwise":
        d["F"] = d["C"]

    def flops(d: dict) -> float:
        per_out = d["C"] * d["KH"] ** 2 * (1 if d["kind"] == "depthwise" else d["F"])
        return 2.0 * d["N"] * d["OH"] ** 2 * per_out

    return _shrink(d, ("OH", "C", "F") if kind != "depthwise" else ("OH", "C"), flops, MAX_FLOPS)


def _activation_shape(rng: random.Random) -> list[int]:
    r = rng.random()
    if r < 0.4:
        shape = [1, _dim(rng, SPATIAL, 2, 112), 0, _dim(rng, CHANNELS, 3, 512)]
        shape[2] = shape[1]
    elif r < 0.8:
        shape = [_dim(rng, TOKENS, 1, 1024), _dim(rng, HIDDEN, 8, 4096)]
    else:
        shape = [_dim(rng, (1000, 4096, 65536), 16, 1 << 20, 0.3)]
    while math.prod(shape) > MAX_ELEMS:
        i = max(range(len(shape)), key=lambda i: shape[i])
        shape[i] //= 2
    return shape


def _elementwise(rng: random.Random, dtype: str) -> dict:
    n = rng.randint(1, 6)
    unary = list(UNARY_WEIGHTS) if dtype != "i8" else list(kernels.UNARY_I)
    binary = kernels.BINARY_F if dtype != "i8" else kernels.BINARY_I
    weights = [UNARY_WEIGHTS.get(u, 1) for u in unary]
    ops = [("bin_" + rng.choice(binary)) if rng.random() < 0.35 else rng.choices(unary, weights)[0]
           for _ in range(n)]
    return {"shape": _activation_shape(rng), "ops": ops, "fused": rng.random() < 0.4}


def _reduction(rng: random.Random, dtype: str) -> dict:
    shape = _activation_shape(rng)
    if len(shape) == 4:
        shape = [shape[1] * shape[2], shape[3]] if rng.random() < 0.5 else shape[1:]
    if len(shape) == 1:
        shape = [max(1, shape[0] // 256), 256]
    rank = len(shape)
    axes = rng.choice([[rank - 1], [0], list(range(rank - 1 if rank > 2 else 0, rank))] if rank > 1 else [[0]])
    kinds = ("sum", "max") if dtype == "i8" else ("sum", "max", "mean")
    return {"shape": shape, "axes": sorted(set(axes)), "kind": rng.choice(kinds)}


def _rows(rng: random.Random, hidden: tuple[int, ...]) -> list[int]:
    shape = [_dim(rng, TOKENS, 1, 1024), _dim(rng, hidden, 8, 4096)]
    if rng.random() < 0.3:
        shape = [rng.choice((1, 4, 12))] + shape
    while math.prod(shape) > MAX_ELEMS // 2:
        shape[-2] = max(1, shape[-2] // 2)
    return shape


def _fused(rng: random.Random, dtype: str) -> dict:
    kind = rng.choices(("matmul_epilogue", "conv_epilogue", "attention"), (2, 2, 1 if dtype != "i8" else 0))[0]
    acts = ("relu", "gelu", "sigmoid") if dtype != "i8" else ("relu",)
    if kind == "attention":
        d = _bmm(rng)
        return {**d, "kind": kind}
    if kind == "matmul_epilogue":
        d = _matmul(rng)
    else:
        d = _conv(rng)
        d["conv"] = d.pop("kind") if d["kind"] != "depthwise" else "conv_nhwc"
        d["F"] = d["F"] if d["conv"] != "depthwise" else d["C"]
    d["ops"] = ["bias", rng.choice(acts)] if rng.random() < 0.8 else [rng.choice(acts)]
    d["kind"] = kind
    return d


def sample(rng: random.Random, family: str | None = None, dtype: str | None = None) -> KernelSpec:
    family = family or rng.choice(FAMILIES)
    dtypes = ("f32", "bf16") if family in FLOAT_ONLY else DTYPES
    dtype = dtype or rng.choices(dtypes, (2, 1, 1)[:len(dtypes)])[0]
    if family == "matmul":
        p = _matmul(rng)
    elif family == "batch_matmul":
        p = _bmm(rng)
    elif family == "conv":
        p = _conv(rng)
    elif family == "elementwise":
        p = _elementwise(rng, dtype)
    elif family == "reduction":
        p = _reduction(rng, dtype)
    elif family == "softmax":
        p = {"shape": _rows(rng, (10, 64, 128, 197, 256, 1000))}
    elif family == "layernorm":
        p = {"shape": _rows(rng, HIDDEN)}
    else:
        p = _fused(rng, dtype)
    return KernelSpec(family, dtype, p)


def generate(n: int, seed: int = 0, dtype_twins: float = 0.4, family: str | None = None) -> list[KernelSpec]:
    """`n` distinct kernels (of one `family` only, if given: more examples of one family's code paths). With
    probability `dtype_twins` a shape is also emitted in a second dtype, so held-out shapes are whole shapes
    (every dtype of one), not single kernels."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    rng = random.Random(seed)
    out: dict[str, KernelSpec] = {}
    while len(out) < n:
        spec = sample(rng, family)
        out.setdefault(spec.key(), spec)
        if len(out) < n and rng.random() < dtype_twins and spec.family not in ("elementwise", "reduction"):
            allowed = [d for d in (("f32", "bf16") if spec.family in FLOAT_ONLY or spec.params.get("kind") ==
                                   "attention" else DTYPES) if d != spec.dtype]
            twin = KernelSpec(spec.family, rng.choice(allowed), spec.params)
            out.setdefault(twin.key(), twin)
    return list(out.values())


def generate_tuned(n_shapes: int, seed: int = 0) -> list[KernelSpec]:
    """`n_shapes` f32 matmul shapes (from the matmul distribution, at least 16x16, at most 5e7 FLOPs), each
    with every candidate tile of TILES and with IREE's default."""
    rng = random.Random(10_000 + seed)
    shapes: dict[tuple, dict] = {}
    while len(shapes) < n_shapes:
        d = _shrink(_matmul(rng), ("M", "K", "N"), lambda d: 2 * d["M"] * d["K"] * d["N"], 5e7)
        if min(d["M"], d["N"]) >= 16:
            shapes.setdefault((d["M"], d["K"], d["N"]), d)
    return [KernelSpec(TUNED, "f32", {**d, "tile": list(t) if t else None})
            for d in shapes.values() for t in (None, *TILES)]
