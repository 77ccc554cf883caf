"""Train one model with one learning rule, measure its memory, and return a JSON-ready result."""
from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from memfit.memory.allocator import AllocatorMeter

from .data import Dataset, load_dataset, subset
from .errors import LocalTrainingError
from .memory import MemoryReport, TrainingMemoryMeter
from .models import ModelConfig, build_model
from .rules import DEFAULT_LOCAL_LOSS, METHODS, check_rule_options, make_rule

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    dataset: str = "digits"
    model: str = "mlp"
    depth: int = 3
    width: int | None = None
    method: str = "tpsgd"
    epochs: int = 3
    batch_size: int = 64
    seed: int = 0
    lr: float = 1e-3
    optimizer: str = "adam"
    local_loss: str = DEFAULT_LOCAL_LOSS
    activation: str = "relu"
    rnn_cell: str = "gru"
    store_projections: bool = True
    target_scale: float = 1.0  # multiplies every projection P_i (tpSGD's targets; DRTP/DFA signals)
    time_weighting: str = "square"  # recurrent blocks: weight of each step's local loss / feedback
    fused_local: bool = True  # lean one-node step for Linear+act blocks of tpSGD/DRTP (fused.py)
    rnn_window: int = 1  # recurrent local rules: detach the state every k steps (1: no backprop through time)
    remember_bias: float = 0.0  # rnn (gru/lstm): init bias added to the update/forget gate (model, every method)
    rnn_credit: str = "step"  # rnn local rules at window 1: "leak" sends h_T's signal back along the GRU leak
    conv_grid: int = 1  # tpSGD cnn: local target on g x g region means of each channel (1: channel means)
    max_train: int | None = None  # keep this many training examples (None: all)
    max_steps: int | None = None  # stop each epoch after this many steps (memory probes)
    data_dir: str | None = None

    def validate(self) -> None:
        for name in ("depth", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise LocalTrainingError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        for name in ("max_train", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LocalTrainingError(f"--{name.replace('_', '-')} must be positive (got {value})")
        if not self.lr > 0:
            raise LocalTrainingError(f"--lr must be positive (got {self.lr})")
        if self.method not in METHODS:
            raise LocalTrainingError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise LocalTrainingError(f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
        check_rule_options(self.method, self.local_loss, self.target_scale, self.time_weighting, self.rnn_window,
                           self.conv_grid, self.rnn_credit, gru_only=self.model == "rnn" and self.rnn_cell == "gru")
        self.model_config().validate()

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.model, self.depth, self.width, self.activation, self.rnn_cell,
                           remember_bias=self.remember_bias)


@dataclass
class TrainResult:
    method: str
    model: str
    dataset: str
    depth: int
    width: int
    epochs: int
    batch_size: int
    seed: int
    test_accuracy: float  # fraction in [0, 1] after the last epoch
    train_seconds: float
    peak_overhead_bytes: int
    peak_training_bytes: int
    peak_rss_bytes: int
    allocator_peak_bytes: int  # the allocator's peak within the last step (memfit.memory.allocator)
    memory: dict
    curve: list[dict] = field(default_factory=list)  # per epoch: train loss/accuracy, test accuracy
    settings: dict = field(default_factory=dict)  # the rule's knobs (lr, losses, recurrent options), to rerun it

    def to_json(self) -> dict:
        return asdict(self)


def make_optimizer_factory(name: str, lr: float):
    if name == "adam":
        # fused: torch's one-kernel Adam, the same update without the two parameter-sized temporaries the
        # per-tensor path allocates for sqrt(v) / bias correction (they set tpSGD's step peak before)
        return lambda params: torch.optim.Adam(params, lr=lr, fused=True)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


@torch.no_grad()
def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    net.train()
    return correct / max(1, len(y))


def train(cfg: TrainConfig, data: Dataset | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Train `cfg.model` with `cfg.method`; `progress(label, done, total)` is called after every step."""
    cfg.validate()
    if data is None:
        data = load_dataset(cfg.dataset, cfg.seed, cfg.data_dir)
    data = subset(data, cfg.max_train, cfg.seed)
    net = build_model(cfg.model_config(), data.image_shape, data.num_classes, cfg.seed)
    rule = make_rule(cfg.method, net, make_optimizer_factory(cfg.optimizer, cfg.lr), data.num_classes, cfg.seed,
                     cfg.local_loss, cfg.store_projections, target_scale=cfg.target_scale,
                     time_weighting=cfg.time_weighting, fused=cfg.fused_local, rnn_window=cfg.rnn_window,
                     conv_grid=cfg.conv_grid, rnn_credit=cfg.rnn_credit)
    n = len(data.y_train)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    meter = TrainingMemoryMeter(net)
    curve, train_seconds, allocator_peak = [], 0.0, 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=shuffle)
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        with meter:
            for s in range(steps):
                idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                x, y = data.x_train[idx], data.y_train[idx]  # (B, 1, H, W), (B,)
                last = epoch == cfg.epochs - 1 and s == steps - 1
                # the allocator's peak within one steady-state step (the last: Adam's state exists by then)
                with AllocatorMeter() if last else contextlib.nullcontext() as allocator:
                    loss, logits = rule.train_step(x, y)
                if last:
                    allocator_peak = allocator.peak_bytes
                loss_sum += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                if s % 50 == 0:
                    meter.sample_rss()
                if progress is not None:
                    progress(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", s + 1, steps)
        train_seconds += time.perf_counter() - start
        curve.append({
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "test_accuracy": evaluate(net, data.x_test, data.y_test),
        })
    report: MemoryReport = meter.report(rule.optimizers, rule.extra_state_bytes)
    return TrainResult(
        method=cfg.method, model=cfg.model, dataset=data.name, depth=cfg.depth,
        width=cfg.model_config().hidden_width, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
        test_accuracy=curve[-1]["test_accuracy"], train_seconds=round(train_seconds, 3),
        peak_overhead_bytes=report.peak_overhead_bytes, peak_training_bytes=report.peak_training_bytes,
        peak_rss_bytes=report.peak_rss_bytes, allocator_peak_bytes=allocator_peak, memory=asdict(report), curve=curve,
        settings={k: getattr(cfg, k) for k in ("lr", "optimizer", "local_loss", "activation", "rnn_cell",
                                               "target_scale", "time_weighting", "rnn_window", "fused_local",
                                               "remember_bias", "rnn_credit", "conv_grid", "max_train")},
    )


def environment() -> dict:
    """Machine facts benchmarks and the CLI put next to their figures."""
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
    }
