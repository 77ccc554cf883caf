"""timm vision transformers sized for 28x28 single-channel images (Fashion-MNIST).

A model is described by a `ModelSpec`: the timm model name plus the keyword arguments that override its
default configuration. The spec is what a checkpoint stores, so any model here (or any timm model a user
has) can be rebuilt with `timm.create_model(spec.timm_name, **spec.kwargs)`.

Default sizes were chosen so one epoch over the 60k training images takes at most about three minutes on a
2-core CPU with 2 threads (measured in docs/quant.md):
- vit:  patch 4 -> 7x7 = 49 patch tokens + [CLS]; 6 blocks of width 96, 3 heads.
- deit: the same backbone plus DeiT's distillation token and a second head (51 tokens).
- swin: patch 2 -> a 14x14 grid; window 7 divides it (4 windows), patch merging -> 7x7 (one window).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import QuantError, UnknownArchitectureError

ARCHS = ("vit", "deit", "swin")

# timm base names; every kwarg below overrides that model's default configuration.
_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, patch_size=4)),
    "deit": ("deit_tiny_distilled_patch16_224",
             dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, patch_size=4)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(embed_dim=48, depths=(2, 2), num_heads=(3, 6), mlp_ratio=2.0, patch_size=2, window_size=7)),
}
# A model small enough for tests to train for a few steps in a second or two.
_TINY: dict[str, dict[str, Any]] = {
    "vit": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=7),
    "deit": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=7),
    "swin": dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), mlp_ratio=2.0, patch_size=2, window_size=7),
}
# timm model classes whose blocks memfit.quant knows how to quantize and explain (LRP); anything else is
# refused with the list of these.
SUPPORTED_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "SwinTransformer")


@dataclass
class ModelSpec:
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        """vit | deit | swin, from the timm name."""
        return arch_of(self.timm_name)

    def build(self) -> torch.nn.Module:
        import timm

        try:
            model = timm.create_model(self.timm_name, pretrained=False, **self.kwargs)
        except RuntimeError as exc:  # timm's "Unknown model (...)"
            raise UnknownArchitectureError(
                f"timm does not know the model {self.timm_name!r} ({exc}); memfit.quant supports timm ViT, "
                f"DeiT (distilled) and Swin models"
            ) from exc
        except TypeError as exc:  # arguments the model does not take (a config.json's "model_args")
            raise QuantError(f"timm cannot build {self.timm_name!r} with {self.kwargs}: {exc}") from None
        check_supported(model)
        return model


def arch_of(timm_name: str) -> str:
    name = timm_name.lower()
    if name.startswith("deit") and "distilled" in name:
        return "deit"
    if name.startswith(("vit", "deit")):
        return "vit"
    if name.startswith("swin") and not name.startswith("swinv2"):
        return "swin"
    raise UnknownArchitectureError(
        f"unsupported architecture {timm_name!r}; memfit.quant supports timm ViT (vit_*, deit_*), "
        f"distilled DeiT (deit_*_distilled_*) and Swin (swin_*) models"
    )


def check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise UnknownArchitectureError(
            f"unsupported model class {name}; memfit.quant supports {', '.join(SUPPORTED_CLASSES)} (timm)"
        )


def default_spec(arch: str, in_chans: int = 1, img_size: int = 28, num_classes: int = 10,
                 tiny: bool = False) -> ModelSpec:
    """The spec of one of the default models (`tiny`: the test-sized variant)."""
    if arch not in _DEFAULTS:
        raise UnknownArchitectureError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    timm_name, kwargs = _DEFAULTS[arch]
    kwargs = dict(_TINY[arch] if tiny else kwargs)
    kwargs.update(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    return ModelSpec(timm_name, kwargs)
