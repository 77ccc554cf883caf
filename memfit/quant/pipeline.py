"""`memfit quant vit` end to end: load, calibrate, allocate, quantize, pack, evaluate, time."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from .errors import QuantError


@dataclass
class QuantRun:
    model: str  # checkpoint path
    allocator: str = "lrp-zplus"  # lrp's epsilon rules do not conserve on deeper-trained models (docs/quant.md)
    avg_bits: float = 4.0
    act_bits: int | None = None
    avg_act_bits: float | None = None
    calib: int = 256
    seed: int = 0
    channelwise: bool = True  # clipped channel-wise post-LayerNorm activations (False: per tensor)
    attention_rule: str = "cp"
    data_dir: str | None = None
    max_test: int | None = None  # evaluate on the first this many test images (None: all 10k)
    latency_batch: int = 100

    def validate(self) -> None:
        from .quantizers import BIT_CHOICES

        if self.act_bits is None and self.avg_act_bits is None:
            raise QuantError("give --act-bits A (every activation at A bits) or --avg-act-bits B (allocated)")
        if self.act_bits is not None and self.avg_act_bits is not None:
            raise QuantError("give only one of --act-bits and --avg-act-bits")
        if self.act_bits is not None and self.act_bits not in BIT_CHOICES:
            raise QuantError(f"--act-bits {self.act_bits} is not supported; choose from "
                             f"{', '.join(map(str, BIT_CHOICES))}")
        check_seed(self.seed)
        if self.calib < 4:
            raise QuantError(f"--calib must be at least 4 images (got {self.calib})")
        if self.max_test is not None and self.max_test < 1:  # 0 scored no image; -1 sliced off the last one
            raise QuantError(f"--max-test must be at least 1 image, or left out for all 10k (got {self.max_test})")
        for flag, value in (("--avg-bits", self.avg_bits), ("--avg-act-bits", self.avg_act_bits)):
            if value is not None and not math.isfinite(value):  # NaN compared false everywhere: every layer at 8
                raise QuantError(f"{flag} must be a number of bits (got {value})")
            if value is not None and value > max(BIT_CHOICES):  # 100 was taken and meant every layer at 8
                raise QuantError(f"{flag} {value:g} is above {max(BIT_CHOICES)}, the widest width "
                                 f"({', '.join(map(str, BIT_CHOICES))}): {max(BIT_CHOICES)} puts every layer at "
                                 f"{max(BIT_CHOICES)} bits")


def check_seed(seed: int) -> None:
    """torch's generators take a 64-bit seed: past it, --seed was 'Overflow when unpacking long long'."""
    if not -2**63 <= seed <= 2**64 - 1:
        raise QuantError(f"--seed must be within -2^63 .. 2^64 - 1, torch's generator seed (got {seed})")


def check_input_shape(model: torch.nn.Module, image_shape: tuple[int, int, int]) -> None:
    """The model must take the data's images: quant vit calibrates and evaluates on Fashion-MNIST (1x28x28)."""
    pe = model.patch_embed
    want = (pe.proj.in_channels, *tuple(pe.img_size))
    if want != tuple(image_shape):
        raise QuantError(f"the checkpoint takes {want[0]}x{want[1]}x{want[2]} images but the calibration and test "
                         f"data are {'x'.join(map(str, image_shape))} (Fashion-MNIST); train a model for them with "
                         f"`memfit quant train-vit`, or give a timm checkpoint built with in_chans=1, img_size=28")


def _median_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_quant(cfg: QuantRun, data=None, progress=None) -> tuple[dict, torch.nn.Module, object]:
    """(JSON-ready result, packed runtime model, model spec). `progress(label, done, total)`, when given, hears of
    each stage as it starts (the CLI's progress bar)."""
    stages = ("allocating bits", "quantizing", "evaluating packed", "evaluating simulated", "evaluating fp32",
              "timing")

    def stage(label: str) -> None:
        if progress is not None:
            progress(f"{label} ({cfg.allocator})" if label == "allocating bits" else label, stages.index(label),
                     len(stages))

    from memfit.train.local.data import load_fashion_mnist

    from .allocators import allocate_bits
    from .checkpoint import load_checkpoint
    from .export import to_packed, weight_bytes
    from .lrp import quantizable_layers
    from .qmodel import QuantConfig, quantize_model
    from .train import environment, evaluate

    cfg.validate()
    model, spec, _ = load_checkpoint(cfg.model)
    data = data if data is not None else load_fashion_mnist(cfg.data_dir)
    check_input_shape(model, data.image_shape)
    if cfg.calib > len(data.y_train):
        raise QuantError(f"--calib {cfg.calib} is larger than the {len(data.y_train)} training images; "
                         f"use at most {len(data.y_train)}")
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.calib]
    calib_x, calib_y = data.x_train[idx], data.y_train[idx]
    if cfg.max_test is not None and cfg.max_test > len(data.y_test):  # a slice past the end: silently all of them
        raise QuantError(f"--max-test {cfg.max_test} is larger than the {len(data.y_test)} test images; "
                         f"leave it out to evaluate on all of them")
    x_test, y_test = data.x_test[:cfg.max_test], data.y_test[:cfg.max_test]
    stage("allocating bits")
    alloc = allocate_bits(model, cfg.allocator, cfg.avg_bits, calib_x, calib_y, cfg.act_bits, cfg.avg_act_bits,
                          cfg.seed, cfg.attention_rule, channelwise=cfg.channelwise)
    stage("quantizing")
    qmodel = quantize_model(model, calib_x, QuantConfig(alloc.weight_bits, alloc.act_bits, cfg.channelwise))
    packed = to_packed(qmodel)
    fp_bytes = sum(m.weight.numel() * m.weight.element_size() for m in quantizable_layers(model).values())
    batch = x_test[:cfg.latency_batch]
    stage("evaluating packed")
    top1 = evaluate(packed, x_test, y_test)
    stage("evaluating simulated")
    simulated_top1 = evaluate(qmodel, x_test, y_test)
    stage("evaluating fp32")
    fp_top1 = evaluate(model, x_test, y_test)
    stage("timing")
    result = {
        "model": str(cfg.model), "timm_name": spec.timm_name, "allocator": cfg.allocator,
        "top1": top1, "simulated_top1": simulated_top1, "fp_top1": fp_top1, "test_images": len(y_test),
        "avg_weight_bits": alloc.avg_weight_bits, "avg_act_bits": alloc.avg_act_bits,
        "bits_per_layer": alloc.weight_bits, "act_bits_per_layer": alloc.act_bits,
        "weight_bytes": weight_bytes(packed), "fp_weight_bytes": fp_bytes,
        "latency_ms": {"batch": len(batch), "fp32": _median_ms(model, batch), "packed": _median_ms(packed, batch),
                       "simulated": _median_ms(qmodel, batch)},
        "importance": alloc.importance, "allocation_seconds": alloc.seconds,
        "calibration": {"images": cfg.calib, "seed": cfg.seed},
        "activations": "clipped channel-wise post-LayerNorm (reparameterised)" if cfg.channelwise else "per tensor",
        "budget": {"avg_bits": cfg.avg_bits, "act_bits": cfg.act_bits, "avg_act_bits": cfg.avg_act_bits},
        "environment": environment(),
    }
    return result, packed, spec


def plot_allocation(result: dict, path: str) -> None:
    """Per-layer importance (the allocator's signal) and the weight/activation bits it chose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["bits_per_layer"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, len(names) * 0.3), 6), sharex=True)
    imp = result["importance"]
    ax1.bar(range(len(names)), [imp.get(n, 0.0) for n in names], color="tab:blue")
    ax1.set_ylabel(f"{result['allocator']} importance")
    ax2.bar([i - 0.2 for i in range(len(names))], [result["bits_per_layer"][n] for n in names], 0.4, label="weight")
    ax2.bar([i + 0.2 for i in range(len(names))], [result["act_bits_per_layer"][n] for n in names], 0.4,
            label="activation")
    ax2.set_ylabel("bits")
    ax2.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax2.legend()
    fig.suptitle(f"{result['timm_name']}: top-1 {result['top1']:.4f} (fp {result['fp_top1']:.4f}), "
                 f"W{result['avg_weight_bits']:.2f}/A{result['avg_act_bits']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
