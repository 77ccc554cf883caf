"""Per-layer contribution scores from LRP, averaged over a calibration set (LRP-QViT's bit-allocation signal).

For each calibration image, the relevance of the explained class (its label) is propagated back; a layer's
contribution is the absolute relevance at its output neurons, as a share of the sum over all quantizable
layers (so every image counts alike, whatever its logit). The score is the mean share over the set; its
spread is the standard deviation of the means of disjoint subsets, which says whether the ranking of layers
is a property of the model or of the images drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lrp import quantizable_layers, relevance


@dataclass
class ContributionScores:
    layers: list[str]  # quantizable layers in forward order
    mean: dict[str, float]  # mean share of relevance, sums to 1
    subset_std: dict[str, float]  # std of the subset means
    images: int
    subsets: int
    attention: str
    rules: str = "epsilon"

    def to_json(self) -> dict:
        return {"mean": self.mean, "subset_std": self.subset_std, "images": self.images, "subsets": self.subsets,
                "attention_rule": self.attention, "rules": self.rules}


def contribution_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, subsets: int = 4,
                        batch_size: int = 64, attention: str = "cp", rules: str = "epsilon") -> ContributionScores:
    """Scores for images x (N, C, H, W) explaining labels y (N,) (default: the predicted classes), under the LRP
    rule set `rules` (lrp.LINEAR_RULES)."""
    if len(x) < subsets:
        raise ValueError(f"{len(x)} calibration images cannot make {subsets} subsets; use more images")
    layers = list(quantizable_layers(model))
    shares = []  # (N, L)
    for i in range(0, len(x), batch_size):
        rel = relevance(model, x[i:i + batch_size], None if y is None else y[i:i + batch_size], attention, rules)
        absolute = torch.stack([rel.layers[name][1] for name in layers], dim=1)  # (B, L)
        shares.append(absolute / absolute.sum(dim=1, keepdim=True).clamp_min(1e-30))
    share = torch.cat(shares)  # (N, L)
    mean = share.mean(0)
    subset_means = torch.stack([part.mean(0) for part in share.chunk(subsets)])  # (subsets, L)
    std = subset_means.std(0, unbiased=True) if subsets > 1 else torch.zeros_like(mean)
    return ContributionScores(layers, dict(zip(layers, mean.tolist())), dict(zip(layers, std.tolist())),
                              len(x), subsets, attention, rules)
