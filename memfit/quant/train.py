"""Train a small timm ViT / DeiT / Swin on Fashion-MNIST (the models quantized by `memfit quant vit`).

AdamW with a linear warm-up and cosine decay, random horizontal flips; DeiT trains its distillation head on
a teacher's hard labels (DeiT's hard distillation) when a teacher checkpoint is given, else on the labels.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import QuantError
from .models import ARCHS, ModelSpec, default_spec

Progress = Callable[[str, int, int], None]


@dataclass
class TrainViTConfig:
    arch: str = "vit"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0
    max_train: int | None = None  # a seeded subset of the training images (None: all 60k)
    max_steps: int | None = None  # stop after this many optimizer steps in all (tests)
    tiny: bool = False  # the test-sized model
    teacher: str | None = None  # deit: checkpoint whose predictions train the distillation head
    data_dir: str | None = None
    log_every: int = 20  # one loss point per this many steps

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise QuantError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise QuantError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.warmup_steps < 0:
            raise QuantError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        for name in ("max_train", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise QuantError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if not 0 < self.lr < math.inf:  # inf trained every weight to NaN
            raise QuantError(f"--lr must be a positive finite number (got {self.lr})")
        from .pipeline import check_seed

        check_seed(self.seed)
        if self.teacher and self.arch != "deit":
            raise QuantError("--teacher only applies to --arch deit (its distillation head)")


@dataclass
class TrainViTResult:
    spec: ModelSpec
    config: TrainViTConfig
    test_accuracy: list[float] = field(default_factory=list)  # after each epoch, on the 10k test images
    epoch_seconds: list[float] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean training loss over each log window
    steps: int = 0

    def to_json(self) -> dict:
        return {
            "arch": self.config.arch, "timm_name": self.spec.timm_name, "kwargs": self.spec.kwargs,
            "config": asdict(self.config), "steps": self.steps, "test_accuracy": self.test_accuracy,
            "final_test_accuracy": self.test_accuracy[-1] if self.test_accuracy else None,
            "epoch_seconds": self.epoch_seconds, "loss_steps": self.loss_steps, "losses": self.losses,
            "environment": environment(),
        }


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (eval mode) on images x (N, C, H, W) with labels y (N,)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return correct / max(len(y), 1)


def _lr_at(step: int, total: int, cfg: TrainViTConfig) -> float:
    warmup = min(cfg.warmup_steps, total // 10)  # short runs (tests) still warm up, then decay
    if step < warmup:  # (warmup 0: straight into the cosine)
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _teacher_labels(path: str, x: torch.Tensor) -> torch.Tensor:
    from .checkpoint import load_checkpoint

    teacher, _, _ = load_checkpoint(path)
    with torch.no_grad():
        return torch.cat([teacher(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])


def train_vit(cfg: TrainViTConfig, data, progress: Progress | None = None) -> tuple[torch.nn.Module, TrainViTResult]:
    """Train the default `cfg.arch` model on `data` (a memfit.train.local.data.Dataset)."""
    from memfit.train.local.data import subset

    cfg.validate()
    if cfg.max_train is not None and cfg.max_train > len(data.y_train):  # as --max-test: not silently all of them
        raise QuantError(f"--max-train {cfg.max_train} is larger than the {len(data.y_train)} training images; "
                         f"leave it out to train on all of them")
    data = subset(data, cfg.max_train, cfg.seed)
    torch.manual_seed(cfg.seed)
    c, h, w = data.image_shape
    if h != w:
        raise QuantError(f"square images expected, got {h}x{w}")
    spec = default_spec(cfg.arch, in_chans=c, img_size=h, num_classes=data.num_classes, tiny=cfg.tiny)
    model = spec.build()
    distilled = hasattr(model, "set_distilled_training")
    teacher_y = _teacher_labels(cfg.teacher, data.x_train) if cfg.teacher else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    result = TrainViTResult(spec, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    window: list[float] = []
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        if distilled:
            model.set_distilled_training(True)
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]  # (B, C, H, W), (B,)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            out = model(x)
            if isinstance(out, tuple):  # DeiT in distilled training: (class head, distillation head)
                y_dist = teacher_y[idx] if teacher_y is not None else y
                loss = 0.5 * F.cross_entropy(out[0], y) + 0.5 * F.cross_entropy(out[1], y_dist)
            else:
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_value = float(loss.detach())
            window.append(loss_value)
            if len(window) == cfg.log_every:
                result.loss_steps.append(step)
                result.losses.append(sum(window) / len(window))
                window.clear()
            if progress:
                progress(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.3f}", step, total)
        if distilled:
            model.set_distilled_training(False)
        result.epoch_seconds.append(time.perf_counter() - t0)
        result.test_accuracy.append(evaluate(model, data.x_test, data.y_test))
        if step >= total:
            break
    if window:
        result.loss_steps.append(step)
        result.losses.append(sum(window) / len(window))
    result.steps = step
    return model.eval(), result


def plot_loss(result: TrainViTResult, path: str) -> None:
    """Training loss against step (and test accuracy per epoch on a second axis) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.loss_steps, result.losses, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    if result.test_accuracy:
        ax2 = ax.twinx()
        per_epoch = result.steps / len(result.test_accuracy)
        ax2.plot([per_epoch * (i + 1) for i in range(len(result.test_accuracy))], result.test_accuracy, "o-",
                 color="tab:orange", label="test accuracy")
        ax2.set_ylabel("test top-1")
    ax.set_title(f"{result.spec.timm_name} on Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
