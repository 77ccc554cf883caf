"""Highly branched networks built here (weights never allocated: build them under torch.device("meta")).

- `randwire`: RandWire (Xie et al. 2019, "Exploring randomly wired neural networks"), small regime: each stage
  is a Watts-Strogatz graph (networkx) oriented from lower to higher node index; a node aggregates its inputs by
  a sigmoid-weighted sum, then ReLU -> 3x3 separable conv -> BN; nodes without predecessors read the stage
  input (stride 2), the stage output is the mean of the nodes without successors.
- `darts`: the DARTS (Liu et al. 2019) CIFAR network with the published DARTS_V2 genotype (normal and reduction
  cells of four nodes, each summing two operations on earlier states, outputs concatenated).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RandWireConfig:
    nodes: int = 16  # per stage
    k: int = 4  # Watts-Strogatz: each node joined to k nearest neighbours on the ring
    p: float = 0.75  # rewiring probability
    stages: int = 2
    channels: int = 78  # the paper's small regime
    classes: int = 10
    seed: int = 0
    input_shape: tuple[int, int, int] = (3, 32, 32)


@dataclass
class DartsConfig:
    cells: int = 8  # reductions at 1/3 and 2/3 of the depth
    channels: int = 16
    classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)


# DARTS_V2 (Liu et al. 2019, genotypes.py): (operation, input state) pairs, two per node; concat nodes 2..5
DARTS_V2_NORMAL = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                   ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)]
DARTS_V2_REDUCE = [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                   ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)]


def ws_dag(nodes: int, k: int, p: float, seed: int) -> list[list[int]]:
    """Predecessors of each node of a Watts-Strogatz graph oriented low -> high index (acyclic)."""
    try:
        import networkx as nx
    except ImportError:
        raise ImportError("randwire graphs need networkx: pip install networkx") from None
    g = nx.connected_watts_strogatz_graph(nodes, k, p, seed=seed)
    preds: list[list[int]] = [[] for _ in range(nodes)]
    for a, b in g.edges():
        lo, hi = sorted((a, b))
        preds[hi].append(lo)
    return [sorted(ps) for ps in preds]


def randwire(cfg: RandWireConfig):
    import torch
    from torch import nn

    def sep_conv(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                             nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    class Stage(nn.Module):
        def __init__(self, cin: int, cout: int, seed: int) -> None:
            super().__init__()
            self.preds = ws_dag(cfg.nodes, cfg.k, cfg.p, seed)
            self.ops = nn.ModuleList(sep_conv(cin if not ps else cout, cout, 2 if not ps else 1) for ps in self.preds)
            self.mix = nn.ParameterList(nn.Parameter(torch.zeros(max(1, len(ps)))) for ps in self.preds)
            used = {q for ps in self.preds for q in ps}
            self.sinks = [i for i in range(cfg.nodes) if i not in used]

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, Cin, H, W) -> (B, Cout, H/2, W/2)
            out: list[torch.Tensor] = []
            for i, ps in enumerate(self.preds):
                if ps:
                    w = torch.sigmoid(self.mix[i])
                    h = sum(w[j] * out[q] for j, q in enumerate(ps))
                else:
                    h = x
                out.append(self.ops[i](h))
            return sum(out[i] for i in self.sinks) / len(self.sinks)

    c = cfg.channels
    stem = nn.Sequential(nn.Conv2d(cfg.input_shape[0], c // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(c // 2))
    stages = [Stage(c // 2 if s == 0 else c * 2 ** (s - 1), c * 2 ** s, cfg.seed + s) for s in range(cfg.stages)]
    width = c * 2 ** (cfg.stages - 1)
    head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, cfg.classes))
    return nn.Sequential(stem, *stages, head)


def darts(cfg: DartsConfig):
    import torch
    from torch import nn

    def relu_conv_bn(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    class FactorizedReduce(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(cin, cout // 2, 1, 2, bias=False), nn.Conv2d(cin, cout // 2, 1, 2, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(x)
            return self.bn(torch.cat([self.a(x), self.b(x[:, :, 1:, 1:])], dim=1))

    def op(name: str, c: int, stride: int) -> nn.Module:
        if name == "skip_connect":
            return nn.Identity() if stride == 1 else FactorizedReduce(c, c)
        if name == "max_pool_3x3":
            return nn.MaxPool2d(3, stride, 1)
        if name == "dil_conv_3x3":
            return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, stride, 2, dilation=2, groups=c, bias=False),
                                 nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        if name == "sep_conv_3x3":
            return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False),
                                 nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                                 nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False),
                                 nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        raise ValueError(f"unknown DARTS operation {name!r}")

    class Cell(nn.Module):
        def __init__(self, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> None:
            super().__init__()
            self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else relu_conv_bn(c_pp, c)
            self.pre1 = relu_conv_bn(c_p, c)
            self.genotype = DARTS_V2_REDUCE if reduction else DARTS_V2_NORMAL
            self.ops = nn.ModuleList(op(n, c, 2 if reduction and i < 2 else 1) for n, i in self.genotype)

        def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:  # (B, C', H, W) each
            states = [self.pre0(s0), self.pre1(s1)]
            for k in range(4):
                (_, i1), (_, i2) = self.genotype[2 * k], self.genotype[2 * k + 1]
                states.append(self.ops[2 * k](states[i1]) + self.ops[2 * k + 1](states[i2]))
            return torch.cat(states[2:], dim=1)  # (B, 4C, H', W')

    class Network(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = cfg.channels
            self.stem = nn.Sequential(nn.Conv2d(cfg.input_shape[0], 3 * c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(3 * c))
            c_pp, c_p, cur, reduction_prev = 3 * c, 3 * c, c, False
            cells = []
            for i in range(cfg.cells):
                reduction = i in (cfg.cells // 3, 2 * cfg.cells // 3)
                cur = cur * 2 if reduction else cur
                cells.append(Cell(c_pp, c_p, cur, reduction, reduction_prev))
                c_pp, c_p, reduction_prev = c_p, 4 * cur, reduction
            self.cells = nn.ModuleList(cells)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_p, cfg.classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s0 = s1 = self.stem(x)
            for cell in self.cells:
                s0, s1 = s1, cell(s0, s1)
            return self.head(s1)

    return Network()
