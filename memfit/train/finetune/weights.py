"""A run's starting weights: Llama's random initialisation (benchmarks) or the model's safetensors.

Both are produced a piece at a time (`LlamaInit`, `SafetensorsFill`): the store asks for the next n fp32 values
of a group and writes them from the optimizer slot they were made in, so the transient is a chunk or a piece,
not a whole group in fp32 (the untied 0.1B embedding: 94 MiB; the tied 0.5B one: 520 MiB). The random values
are the same bits as `init_group`'s, which draws each parameter whole (test_finetune_weights).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from memfit.llm.models.loader import weight_files
from memfit.train.finetune.store import GroupStore
from memfit.train.finetune.units import Group


class WeightsError(ValueError):
    """The model's files do not hold the weights the skeleton needs."""


def init_group(g: Group, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One group's starting values, Llama's initialisation (normal, std 0.02; norms one; biases zero), drawn from
    `gen` in the group's parameter order: (flat fp32 (g.numel,), its per-parameter views). Groups taken in
    forward order from one generator give the trainer's weights (the DeepSpeed reference starts from them too)."""
    flat = torch.empty(g.numel, dtype=torch.float32)
    views = g.views(flat)
    for name, view in views.items():
        if name.endswith("norm.weight"):
            view.fill_(1.0)
        elif name.endswith(".bias"):
            view.zero_()
        else:
            torch.randn(view.shape, generator=gen, out=view).mul_(0.02)
    return flat, views


class LlamaInit:
    """`init_group`'s values of one group, handed out in order, any number at a time (`fill`).

    Why the same bits: torch's CPU normal_ on a contiguous fp32 tensor of >= 16 elements draws one uniform per
    element in order, turns them into normals 16 at a time (Box-Muller on pairs 8 apart), and, when the size is
    not a multiple of 16, draws 16 more uniforms for the last 16 elements. A parameter drawn in chunks that
    start at multiples of 16 from its start, each but the last a multiple of 16 and the last of >= 16 elements
    (or the parameter whole, when it is smaller), consumes the generator in the same order and transforms the
    same blocks."""

    CHUNK = 1 << 16  # elements drawn at once (256 KiB of fp32); a multiple of 16

    def __init__(self, g: Group, gen: torch.Generator) -> None:
        self.gen = gen
        self.params = [(name, math.prod(shape)) for name, shape in g.params]
        self.param = 0  # index of the parameter being drawn
        self.done = 0  # its elements drawn so far
        self.buf = torch.empty(self.CHUNK + 16, dtype=torch.float32)  # one chunk (the last may take 16 more)
        self.ready = self.buf[:0]  # drawn values not yet handed out

    def _chunk(self) -> torch.Tensor:
        name, numel = self.params[self.param]
        left = numel - self.done
        n = left if left < self.CHUNK + 16 else self.CHUNK  # never leave a tail of < 16 elements
        out = self.buf[:n]
        if name.endswith("norm.weight"):
            out.fill_(1.0)
        elif name.endswith(".bias"):
            out.zero_()
        else:
            torch.randn(n, generator=self.gen, out=out).mul_(0.02)
        self.done += n
        if self.done == numel:
            self.param, self.done = self.param + 1, 0
        return out

    def fill(self, out: torch.Tensor) -> None:
        """Write the group's next out.numel() values into `out` (flat fp32)."""
        at, n = 0, out.numel()
        while at < n:
            if self.ready.numel() == 0:
                if self.param == len(self.params):
                    raise ValueError("LlamaInit: asked for more values than the group has")
                self.ready = self._chunk()
            take = min(self.ready.numel(), n - at)
            out[at : at + take].copy_(self.ready[:take])
            self.ready = self.ready[take:]
            at += take


def random_weights(groups: list[Group], store: GroupStore, seed: int) -> None:
    """Llama's initialisation, written into the store a piece at a time, groups in forward order from one
    generator (`init_group`'s values)."""
    gen = torch.Generator().manual_seed(seed)
    for gi, g in enumerate(groups):
        store.fill_group(gi, LlamaInit(g, gen).fill)


class SafetensorsFill:
    """A group's values from the model's safetensors, handed out in order (`fill`), like LlamaInit: a matrix is
    read only over the rows the asked-for values cover (safetensors' get_slice), so the transient is one piece
    and a row in the file's dtype, not the group in fp32; vectors (norms, biases) are read whole."""

    def __init__(self, g: Group, where: dict) -> None:
        self.params, self.where = list(g.params), where
        self.param = 0  # index of the parameter being read
        self.done = 0  # its elements handed out so far

    def fill(self, out: torch.Tensor) -> None:
        """Write the group's next out.numel() values into `out` (flat fp32)."""
        at, n = 0, out.numel()
        while at < n:
            if self.param == len(self.params):
                raise ValueError("SafetensorsFill: asked for more values than the group has")
            name, shape = self.params[self.param]
            numel = math.prod(shape)
            k = min(n - at, numel - self.done)
            part = self.where[name].get_slice(name)
            if len(shape) == 2:  # (rows, cols): the rows that hold elements [done, done + k)
                cols = shape[1]
                r0, r1 = self.done // cols, -(-(self.done + k) // cols)
                skip = self.done - r0 * cols
                src = part[r0:r1].reshape(-1)[skip : skip + k]
            else:
                src = part[:].reshape(-1)[self.done : self.done + k]
            out[at : at + k].copy_(src)
            at += k
            self.done += k
            if self.done == numel:
                self.param, self.done = self.param + 1, 0


def load_weights(path: Path, groups: list[Group], store: GroupStore) -> None:
    """Fill the store from the model's safetensors, a piece at a time (SafetensorsFill); a missing weight or
    one of another shape (a checkpoint of another model) raises WeightsError before anything is written."""
    from safetensors import SafetensorError, safe_open

    handles = []
    for f in weight_files(path):
        try:
            handles.append(safe_open(str(f), framework="pt"))
        except SafetensorError as exc:  # a corrupt or truncated header: the message memfit generate gives
            raise WeightsError(f"{f} is not a readable safetensors file: {exc}") from None
    where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118
    for g in groups:
        missing = [p for p, _ in g.params if p not in where]
        if missing:
            raise WeightsError(f"{path} lacks weight(s) {', '.join(missing[:4])}")
        for name, shape in g.params:
            found = tuple(where[name].get_slice(name).get_shape())
            if found != tuple(shape):
                raise WeightsError(f"{path}: {name} has shape {found}, the model's config gives {tuple(shape)}")
    for gi, g in enumerate(groups):
        store.fill_group(gi, SafetensorsFill(g, where).fill)
