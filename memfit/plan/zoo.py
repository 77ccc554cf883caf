"""Models by name, built on the meta device (no weights allocated): torchvision, timm, memfit built-ins."""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass

from memfit.plan.errors import UnknownModelError


@dataclass
class BertEncoderConfig:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    seq_len: int = 128


BUILTINS = {"bert_base_encoder": BertEncoderConfig(), "bert_tiny_encoder": BertEncoderConfig(2, 128, 2, 512, 128)}


def _cell_builtins() -> dict:
    from memfit.plan.cells import DartsConfig, RandWireConfig

    return {"randwire_ws": ("randwire", RandWireConfig()),  # 2 stages x 16 nodes, WS(4, 0.75), CIFAR size
            "randwire_ws_seed1": ("randwire", RandWireConfig(seed=1)),
            "darts_v2_cifar": ("darts", DartsConfig())}  # 8 cells, C=16 (the DARTS search network's size)


CELL_BUILTINS = _cell_builtins()


def _bert_module(cfg: BertEncoderConfig):
    import torch
    from torch import nn

    class Layer(nn.Module):
        """Post-LN BERT encoder layer: attention + FFN, each with residual and LayerNorm."""

        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(cfg.hidden, 3 * cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden)
            self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
            self.fc1, self.fc2 = nn.Linear(cfg.hidden, cfg.ffn), nn.Linear(cfg.ffn, cfg.hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
            B, T, C = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, cfg.heads, C // cfg.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
            att = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
            x = self.ln1(x + self.proj(att.transpose(1, 2).reshape(B, T, C)))
            return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))

    return nn.Sequential(*[Layer() for _ in range(cfg.layers)])


@contextlib.contextmanager
def _params_to_meta():
    """For constructors that compute with tensors (e.g. regnet): build on CPU, move each parameter/buffer to
    meta the moment it is registered, so at most one layer's weights ever exist."""
    import torch
    from torch import nn

    orig_p, orig_b = nn.Module.register_parameter, nn.Module.register_buffer

    def reg_p(self, name, param):
        orig_p(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def reg_b(self, name, tensor, persistent=True):
        orig_b(self, name, tensor.to("meta") if isinstance(tensor, torch.Tensor) else tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = orig_p, orig_b


def build_model(name: str, batch: int = 1, input_shape: tuple[int, ...] | None = None):
    """Return (module on meta, example input on meta). input_shape excludes the batch dimension."""
    import torch

    if name in CELL_BUILTINS:
        from memfit.plan import cells

        kind, ccfg = CELL_BUILTINS[name]
        with torch.device("meta"):
            model = getattr(cells, kind)(ccfg).eval()
        return model, _example(batch, input_shape or ccfg.input_shape)
    if name in BUILTINS:
        cfg = BUILTINS[name]
        with torch.device("meta"):
            model = _bert_module(cfg).eval()
        return model, _example(batch, input_shape or (cfg.seq_len, cfg.hidden))
    factory, default_shape = _find(name)
    try:
        with torch.device("meta"):
            model = factory()
    except (NotImplementedError, RuntimeError):  # constructor computes on tensors: build with meta params
        with _params_to_meta():
            model = factory()
    model = model.eval()
    return model, _example(batch, input_shape or default_shape)


def _example(batch: int, shape: tuple[int, ...]):
    """The (batch, *shape) example input on meta; refused where its bytes (float32) pass what torch and the plan's
    64-bit sizes hold: --batch 2^62 on resnet18's 3x224x224 was torch's 'Storage size calculation overflowed'."""
    import math

    import torch

    from memfit.plan.errors import PlanError
    from memfit.plan.sizes import MAX_BYTES, approx

    nbytes = 4 * batch * math.prod(shape)
    if nbytes > MAX_BYTES:
        raise PlanError(f"--batch {approx(batch)} x input {'x'.join(map(str, shape))}: {approx(nbytes)} bytes of "
                        f"input alone, above the most a tensor holds ({MAX_BYTES} bytes, 2^63 - 1)")
    return torch.empty(batch, *shape, device="meta")


def _find(name: str):
    import torchvision

    tv = set(torchvision.models.list_models())
    if name in tv:
        return (lambda: torchvision.models.get_model(name, weights=None)), (3, 224, 224)
    try:
        import timm
    except ImportError:  # timm is optional
        timm = None
    if timm is not None and timm.is_model(name):
        cfg = timm.get_pretrained_cfg(name)
        shape = tuple(cfg.input_size) if cfg is not None and getattr(cfg, "input_size", None) else (3, 224, 224)
        return (lambda: timm.create_model(name, pretrained=False)), shape
    known = sorted(tv | set(BUILTINS) | set(CELL_BUILTINS) | (set(timm.list_models()) if timm is not None else set()))
    close = difflib.get_close_matches(name, known, n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: not a torchvision, timm or memfit built-in ({', '.join(BUILTINS)}) name, "
        f"nor an existing .onnx file ({', '.join(CELL_BUILTINS)} are built here).{hint}"
    )
