"""The model cut into swap groups and compute units, and each unit's forward on borrowed weights.

A *group* is the set of parameters swapped as one flat buffer: the embedding, each decoder layer, and the
head (final norm, plus lm_head unless it is tied to the embedding). A *unit* is one step of the layer-wise
forward: embed -> layer 0 .. layer L-1 -> head (norm, logits, loss). A unit uses its own group, and the head
of a tied model uses the embedding's group too.

The model skeleton is built on the meta device (no storage at all); a unit runs its modules with
`torch.func.functional_call` on weights viewed out of the fetched flat buffers, so the engine's model code
is what trains, and the device never holds more than the groups in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from memfit.llm.kernels.attention import DenseCausalAttention
from memfit.llm.models import LlamaForCausalLM, ModelConfig, build_model
from memfit.train.finetune.data import IGNORE


@dataclass(frozen=True)
class Group:
    name: str
    params: tuple[tuple[str, tuple[int, ...]], ...]  # (HF name, shape) in buffer order

    @property
    def numel(self) -> int:
        return sum(_numel(s) for _, s in self.params)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of `flat` (numel,) with the parameter's shape."""
        out, off = {}, 0
        for name, shape in self.params:
            n = _numel(shape)
            out[name] = flat[off : off + n].view(shape)
            off += n
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def skeleton(cfg: ModelConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return build_model(cfg)


def make_groups(model: LlamaForCausalLM) -> list[Group]:
    """Groups in forward order: embed, layer.0 .. layer.{L-1}, head."""
    cfg = model.config

    def named(prefix: str, module: torch.nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((f"{prefix}.{n}", tuple(p.shape)) for n, p in module.named_parameters())

    groups = [Group("embed", (("model.embed_tokens.weight", tuple(model.model.embed_tokens.weight.shape)),))]
    groups += [Group(f"layer.{i}", named(f"model.layers.{i}", layer)) for i, layer in enumerate(model.model.layers)]
    head = [("model.norm.weight", tuple(model.model.norm.weight.shape))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head.weight", tuple(model.lm_head.weight.shape)))
    groups.append(Group("head", tuple(head)))
    return groups


def unit_groups(groups: list[Group], tied: bool) -> list[list[int]]:
    """For each unit (embed, layers, head), the indices of the groups it reads."""
    n = len(groups)
    return [[0]] + [[i] for i in range(1, n - 1)] + [[n - 1, 0] if tied else [n - 1]]


State = tuple[torch.Tensor, ...]  # what flows between units: (ids,) into embed, (x, residual) between layers


class UnitRunner:
    """Runs unit k's forward given its weights (name -> tensor) and input state."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.cfg = model.config
        self.n_layers = model.config.num_hidden_layers

    def forward(self, k: int, weights: dict[str, torch.Tensor], state: State, batch: Batch) -> State:
        m = self.model
        if k == 0:
            return (F.embedding(batch.ids.reshape(-1), weights["model.embed_tokens.weight"]),)  # (N, C)
        if k <= self.n_layers:
            i = k - 1
            prefix = f"model.layers.{i}."
            local = {n[len(prefix):]: w for n, w in weights.items() if n.startswith(prefix)}
            x, residual = state[0], (state[1] if len(state) > 1 else None)
            rope = m.rotary.at(batch.positions, x.dtype)
            x, residual = functional_call(m.model.layers[i], local, (x, residual, rope, batch.attention))
            return (x, residual)
        x, residual = state
        h = m.model.norm.ops.add_rms_norm(x, residual, weights["model.norm.weight"], self.cfg.rms_norm_eps)[1]
        head = weights["model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"]
        logits = F.linear(h, head)  # (N, V), compute dtype
        # Mean over the batch's assistant tokens; cross-entropy in float32 (its log-sum-exp needs the range).
        loss = F.cross_entropy(logits.float(), batch.labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        return (loss / batch.n_targets,)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B*T,)
    attention: DenseCausalAttention
    n_targets: int

    @classmethod
    def make(cls, ids: torch.Tensor, labels: torch.Tensor, model: LlamaForCausalLM, device: torch.device) -> Batch:
        b, t = ids.shape
        positions = torch.arange(t, device=device).repeat(b)
        attn = DenseCausalAttention([t] * b, model.scale, model.config.sliding_window)
        n = int((labels != IGNORE).sum())
        return cls(ids.to(device), labels.to(device), positions, attn, n)
