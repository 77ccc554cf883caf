"""Models for local learning: a stack of hidden blocks plus an output head.

Each hidden block is the unit a local rule trains on its own (input detached, one local loss), so the stack
is kept explicit (`LocalNet.blocks`) rather than hidden inside one `nn.Sequential`. `LocalNet.forward`
chains the blocks normally, which is what backprop and evaluation use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import LocalTrainingError

MODELS = ("mlp", "cnn", "rnn")
RNN_CELLS = ("elman", "gru", "lstm")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
DEFAULT_WIDTH = {"mlp": 256, "cnn": 16, "rnn": 128}


@dataclass
class ModelConfig:
    kind: str = "mlp"  # mlp | cnn | rnn
    depth: int = 3  # weight layers in all: depth-1 hidden blocks + 1 output layer
    width: int | None = None  # hidden units (mlp), channels (cnn), hidden state size (rnn); None = default
    activation: str = "relu"  # hidden non-linearity of mlp/cnn blocks
    rnn_cell: str = "gru"  # elman | gru | lstm
    batch_norm: bool = True  # BatchNorm2d in cnn blocks
    remember_bias: float = 0.0  # rnn: added at init to the GRU update-gate / LSTM forget-gate bias

    def validate(self) -> None:
        if self.kind not in MODELS:
            raise LocalTrainingError(f"unknown model {self.kind!r}; choose one of {', '.join(MODELS)}")
        if self.depth < 1:
            raise LocalTrainingError(f"--depth must be at least 1 (got {self.depth})")
        if self.width is not None and self.width < 1:
            raise LocalTrainingError(f"--width must be positive (got {self.width})")
        if self.activation not in ACTIVATIONS:
            raise LocalTrainingError(f"unknown activation {self.activation!r}; choose {', '.join(ACTIVATIONS)}")
        if self.rnn_cell not in RNN_CELLS:
            raise LocalTrainingError(f"unknown rnn cell {self.rnn_cell!r}; choose one of {', '.join(RNN_CELLS)}")
        if self.remember_bias and (self.kind != "rnn" or self.rnn_cell == "elman"):
            raise LocalTrainingError("--remember-bias needs --model rnn with a gated cell (--rnn-cell gru or lstm)")

    @property
    def hidden_width(self) -> int:
        return self.width if self.width is not None else DEFAULT_WIDTH[self.kind]


class ConvBlock(nn.Module):
    """Conv3x3 -> (BatchNorm) -> activation -> (MaxPool2d 2): (B, Cin, H, W) -> (B, C, H', W')."""

    def __init__(self, c_in: int, c_out: int, act: str, batch_norm: bool, pool: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(ACTIVATIONS[act]())
        if pool:
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class RecurrentBlock(nn.Module):
    """One recurrent layer run one time step at a time, so local rules can update it step by step."""

    def __init__(self, cell: str, n_in: int, hidden: int, remember_bias: float = 0.0):
        super().__init__()
        self.cell_type = cell
        self.hidden = hidden
        if cell == "elman":
            self.cell: nn.Module = nn.RNNCell(n_in, hidden, nonlinearity="tanh")
        elif cell == "gru":
            self.cell = nn.GRUCell(n_in, hidden)
        else:
            self.cell = nn.LSTMCell(n_in, hidden)
        if remember_bias:
            self.add_remember_bias(remember_bias)

    def add_remember_bias(self, value: float) -> None:
        """Shift the gate that keeps the old state towards keeping it: GRU h' = (1 - z) n + z h with
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz), so +value on b_iz (rows H:2H of torch's r|z|n layout);
        LSTM c' = f c + i g, +value on b_if (rows H:2H of i|f|g|o). At init the state then leaks slowly and
        carries the early rows further, which a rule without backprop through time cannot learn to do."""
        if self.cell_type == "elman":
            raise LocalTrainingError("remember_bias needs a gated cell (gru or lstm)")
        with torch.no_grad():
            self.cell.bias_ih[self.hidden:2 * self.hidden] += value

    def init_state(self, batch: int, like: torch.Tensor):
        h = like.new_zeros(batch, self.hidden)  # (B, H)
        return (h, h.clone()) if self.cell_type == "lstm" else h

    def step(self, x_t: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """x_t (B, F), state (B, H) or ((B, H), (B, H)) -> output h_t (B, H), new state."""
        if self.cell_type == "lstm":
            h, c = self.cell(x_t, state)
            return h, (h, c)
        h = self.cell(x_t, state)
        return h, h

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T, F) -> outputs (B, T, H), with the graph through time (used by backprop and eval)."""
        state = self.init_state(seq.shape[0], seq)
        outs = []
        for t in range(seq.shape[1]):
            h, state = self.step(seq[:, t], state)
            outs.append(h)
        return torch.stack(outs, dim=1)


def detach_state(state):
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class LocalNet(nn.Module):
    """Hidden blocks + output head. `prepare` views the (B, 1, H, W) images the way the model reads them."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.kind = cfg.kind
        self.recurrent = cfg.kind == "rnn"
        c, h, w = image_shape
        width = cfg.hidden_width
        blocks: list[nn.Module] = []
        self.block_out_shapes: list[tuple[int, ...]] = []  # per-sample output shape of each hidden block
        if cfg.kind == "mlp":
            n_in = c * h * w
            for _ in range(cfg.depth - 1):
                blocks.append(nn.Sequential(nn.Linear(n_in, width), ACTIVATIONS[cfg.activation]()))
                self.block_out_shapes.append((width,))
                n_in = width
            head_in = n_in
        elif cfg.kind == "cnn":
            c_in, size_h, size_w = c, h, w
            for _ in range(cfg.depth - 1):
                pool = min(size_h, size_w) >= 4  # pool while the map is big enough to halve
                blocks.append(ConvBlock(c_in, width, cfg.activation, cfg.batch_norm, pool))
                if pool:
                    size_h, size_w = size_h // 2, size_w // 2
                c_in = width
                self.block_out_shapes.append((width, size_h, size_w))
            head_in = c_in * size_h * size_w
        else:  # rnn: image rows are time steps, (B, T=H, F=C*W)
            n_in = c * w
            for _ in range(cfg.depth - 1):
                blocks.append(RecurrentBlock(cfg.rnn_cell, n_in, width, cfg.remember_bias))
                self.block_out_shapes.append((width,))
                n_in = width
            head_in = n_in
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(head_in, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) -> mlp (B, H*W) | cnn (B, 1, H, W) | rnn (B, T=H, F=W)."""
        if self.kind == "mlp":
            return x.flatten(1)
        if self.kind == "rnn":
            return x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C*W)
        return x

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """Last hidden output -> head input: rnn keeps the last time step, cnn flattens."""
        if self.recurrent and h.dim() == 3:
            return h[:, -1]  # (B, H)
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prepare(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.head_input(h))  # (B, K)


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> LocalNet:
    """Same seed -> same initial weights, so every method starts from the same network."""
    torch.manual_seed(seed)
    return LocalNet(cfg, image_shape, num_classes)
