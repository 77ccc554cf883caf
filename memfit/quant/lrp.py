"""Layer-wise relevance propagation for timm vision transformers (ViT, DeiT, Swin), AttnLRP-style.

Relevance is computed as input x modified-gradient (the "gradient x input" form of LRP that AttnLRP's `lxt`
uses): during one forward pass under `LRPMode`, the operations whose plain gradient is not an LRP rule are
swapped for autograd functions whose backward applies the rule, so that R_t = t * grad_t at every tensor t:

- Linear / Conv (epsilon rule, bias excluded): y = z + b with z = W x; the relevance of y is handed to z in
  full, R_x = x * W^T (R_y / (z + eps)). The bias takes no relevance, so the rule conserves it (the bias-free
  variant zennit offers as `zero_params="bias"`).
- LayerNorm (AttnLRP's identity rule for normalisation): the standard deviation is held constant, which makes
  the centring and scaling linear in x; the beta shift takes no relevance (as the bias above).
- GELU (identity rule): R_x = R_y.
- products of two activations, q k^T and A v (AttnLRP's uniform rule): each factor gets half.
- softmax, two rules (`attention=`):
  * "attnlrp": the plain gradient, R_x = x (R_y - s sum R_y), AttnLRP's first-order Taylor rule. Alone among
    the rules it does not conserve (the softmax's "bias" term keeps the rest; relative position biases and
    masks added before it, as in Swin, take some too): on a tiny random ViT the first block's total was off
    by up to 12% (measured).
  * "cp" (default): the attention weights are held constant, so A v passes all its relevance to v
    (Ali et al., ICML'22, "conservative propagation"). It conserves exactly, which a contribution score
    (a layer's share of the whole) needs; it is the rule the per-layer scores use unless told otherwise.
- residual additions, pooling, token selection, reshapes: plain gradients are already the epsilon rule there.

Two rule sets for the linear layers and the additions (`rules=`):
  * "epsilon" (default): the rules above. With EPS = 1e-9 they are gradient x input, and on a trained model
    they are numerically unstable: R_x = x W^T (R_z / z) divides by pre-activations near 0, and a residual
    addition y = x + f hands x and f the shares x/y and f/y of R_y, unbounded where x and f cancel. The sums
    still conserve, but as differences of huge opposite terms: on the 25-epoch Fashion-MNIST ViT the absolute
    relevance through blocks.0.attn.qkv is ~1e9 x the logit's (and the first block's sum is off by 26% in
    float32), falling ~10x per block towards the head (measured; docs/quant.md).
  * "zplus": bounded, conserving rules. Linear layers use the z+ rule (LRP-alpha1-beta0 on the products
    z_jk = x_j w_jk): R_j = sum_k z_jk^+ / sum_j' z_j'k^+ R_k, so relevance keeps its sign and no denominator
    falls below the positive products (an output whose products are all negative, positive only through its
    bias, hands its relevance to the negative products instead); additions of two tensors that both carry
    gradient (the residual stream, DeiT's two heads, the position embedding) split R_y in proportion to |x| and
    |f|. Attention, LayerNorm and GELU rules are as above; the patch embedding (whose input relevance nothing
    uses) keeps epsilon.

Why not `lxt`/`zennit` from PyPI: lxt 2.1 (its source read, not installed; it would also pull bitsandbytes and
open_clip_torch) patches the classes of Hugging Face transformers models and of torchvision's ViT, not timm's
ViT/DeiT/Swin; zennit has no rules for attention. (lxt's own ViT map also uses CP-LRP inside the attention,
as our default.) The torch function mode below reaches every op of timm's non-fused attention path without
editing timm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

EPS = 1e-9
ATTENTION_RULES = ("cp", "attnlrp")
LINEAR_RULES = ("epsilon", "zplus")
_ADDS = (torch.Tensor.add, torch.Tensor.__add__, torch.add)  # `a + b` reaches the mode as torch.Tensor.add


def _stab(z: torch.Tensor) -> torch.Tensor:
    """z + eps * sign(z): the epsilon rule's stabiliser (sign(0) taken as +)."""
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class _PassOn(torch.autograd.Function):
    """y = fn(x), handing all of y's relevance to x: grad_x = grad_y * y / x. For y = x + b this is the
    bias-free epsilon rule (the bias takes none), for GELU the identity rule."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y / _stab(x), None


def _add_bias(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _PassOn.apply(z, lambda t: t + b)


class _Uniform(torch.autograd.Function):
    """a @ b of two activations; each factor receives half of the output relevance."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return 0.5 * (g @ b.transpose(-2, -1)), 0.5 * (a.transpose(-2, -1) @ g)


class _ZPlus(torch.autograd.Function):
    """z = x W^T (bias-free) under the z+ rule: only the positive products x_j w_kj carry relevance, so
    R_j = x_j^+ (W^+ s)_j + x_j^- (W^- s)_j with s_k = R_k / Z_k^+, Z^+ = x^+ W^{+T} + x^- W^{-T} >= 0. An output
    with no positive product (Z_k^+ = 0, its relevance coming from its bias) hands R_k to its negative products
    instead, in proportion (so the rule still conserves)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        wp, wn = w.clamp_min(0), w.clamp_max(0)  # (out, in)
        xp, xn = x.clamp_min(0), x.clamp_max(0)  # (..., in)
        zp = F.linear(xp, wp) + F.linear(xn, wn)  # sum of the positive products, (..., out) >= 0
        zn = F.linear(xp, wn) + F.linear(xn, wp)  # and of the negative ones, <= 0
        r = (zp + zn) * g  # R_z, (..., out)
        none = zp <= 0
        sp = torch.where(none, 0.0, r / (zp + EPS))
        sn = torch.where(none, r / (zn - EPS), 0.0)
        # x_j > 0 makes positive products with w > 0 and negative ones with w < 0; x_j < 0 the other way round
        return torch.where(x > 0, sp @ wp + sn @ wn, sp @ wn + sn @ wp), None  # grad_x: x * grad_x = R_x


class _AbsSplit(torch.autograd.Function):
    """y = a + b of two activations (broadcasting allowed); R_y goes to a and b in proportion to |a| and |b|."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        r = (a + b) * g / (a.abs() + b.abs() + EPS)  # R_y / (|a| + |b|)
        return (r * a.sign()).sum_to_size(a.shape), (r * b.sign()).sum_to_size(b.shape)


class _Tap(torch.autograd.Function):
    """Identity that records the relevance (x * grad) per sample as it passes backwards."""

    @staticmethod
    def forward(ctx, x, sink, name):
        ctx.save_for_backward(x)
        ctx.sink, ctx.name = sink, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        r = (x * g).reshape(x.shape[0], -1)  # (B, features)
        ctx.sink[ctx.name] = (r.sum(dim=1).detach(), r.abs().sum(dim=1).detach())
        return g, None, None


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mu = x.mean(dim=dims, keepdim=True)
    sigma = torch.sqrt(x.var(dim=dims, keepdim=True, unbiased=False) + eps).detach()  # held constant
    z = (x - mu) / sigma
    if weight is not None:
        z = z * weight
    return _add_bias(z, bias) if bias is not None else z


class LRPMode(TorchFunctionMode):
    """Swap timm's ops for their LRP rules while active; `names` maps id(weight) -> layer name so the relevance
    through each Linear/Conv is recorded in `sink[name] = (signed sum, absolute sum)`, each (B,)."""

    def __init__(self, names: dict[int, str] | None = None, sink: dict | None = None, attention: str = "cp",
                 rules: str = "epsilon"):
        super().__init__()
        if attention not in ATTENTION_RULES:
            raise ValueError(f"unknown attention rule {attention!r}; choose {', '.join(ATTENTION_RULES)}")
        if rules not in LINEAR_RULES:
            raise ValueError(f"unknown LRP rule set {rules!r}; choose {', '.join(LINEAR_RULES)}")
        self.names, self.sink, self.attention = names or {}, sink if sink is not None else {}, attention
        self.zplus = rules == "zplus"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.conv2d:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            rest = {k: v for k, v in kwargs.items() if k != "bias"}
            z = _ZPlus.apply(x, w) if self.zplus and func is F.linear else func(x, w, None, *args[3:], **rest)
            if id(w) in self.names:  # relevance at the layer's output = relevance through the layer
                z = _Tap.apply(z, self.sink, self.names[id(w)])
            return _add_bias(z, b.view(-1, 1, 1) if func is F.conv2d else b) if b is not None else z
        if self.zplus and func in _ADDS and len(args) == 2 and not kwargs \
                and all(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
            return _AbsSplit.apply(*args)  # residual stream, DeiT's two heads, x + pos_embed; not a constant mask
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.gelu:
            return _PassOn.apply(args[0], lambda t: F.gelu(t, **kwargs))
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax) and self.attention == "cp":
            return func(*args, **kwargs).detach()  # attention weights as constants: A v gives all to v
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul):
            a, b = args
            if a.requires_grad and b.requires_grad and not isinstance(a, nn.Parameter) \
                    and not isinstance(b, nn.Parameter):
                return _Uniform.apply(a, b)
        return func(*args, **kwargs)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d by name, in forward order (patch embedding first, heads last)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order (ViT/DeiT: model.blocks; Swin: every stage's blocks)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [b for stage in model.layers for b in stage.blocks]


@dataclass
class Relevance:
    logit: torch.Tensor  # (B,) relevance put at the output: the explained class's logit
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (signed, |.|) (B,)
    blocks: list[torch.Tensor] = field(default_factory=list)  # relevance summed at each block's output (B,)


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
              attention: str = "cp", rules: str = "epsilon") -> Relevance:
    """One LRP pass: relevance at every quantizable layer and block output for images x (B, C, H, W), explaining
    class `target` (B,) (default: the predicted class), with the softmax rule `attention` (cp | attnlrp) and the
    linear/addition rule set `rules` (epsilon | zplus)."""
    model.eval()
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    for m in fused:
        m.fused_attn = False  # the explicit q k^T -> softmax -> A v path, whose ops the mode can reach
    names = {id(m.weight): n for n, m in quantizable_layers(model).items()}
    out = Relevance(logit=torch.empty(0))
    block_outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        block_outputs.append(output)

    hooks = [b.register_forward_hook(keep) for b in blocks_of(model)]
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            with LRPMode(names, out.layers, attention, rules):
                logits = model(inp)  # (B, K)
            target = logits.argmax(-1) if target is None else target
            seed = F.one_hot(target, logits.shape[-1]).to(logits.dtype)  # R_logits = logits * seed
            logits.backward(seed)
        out.logit = (logits * seed).sum(-1).detach()
        # Swin's window attention runs its layers on (B x windows, tokens, C), batch-major (timm's
        # window_partition), so their taps hold one row per window: fold them back to one per image.
        for name, (signed, absolute) in out.layers.items():
            if signed.shape[0] != len(x):
                out.layers[name] = (signed.reshape(len(x), -1).sum(1), absolute.reshape(len(x), -1).sum(1))
        out.blocks = [(o * o.grad).reshape(o.shape[0], -1).sum(1).detach() for o in block_outputs]
    finally:
        for h in hooks:
            h.remove()
        for m, flag in fused.items():
            m.fused_attn = flag
        model.zero_grad(set_to_none=True)
    return out
