"""`memfit quant ...` commands. Registration is cheap: torch, timm and OR-Tools load inside the commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memfit.errors import PLOT_SUFFIXES, distinct_output, guard, output_path

ARCH_CHOICES = ("vit", "deit", "swin")


def default_checkpoint(arch: str) -> Path:
    """Where trained checkpoints go unless --out says otherwise (never into the repository)."""
    return Path.home() / ".cache" / "memfit" / "quant" / f"{arch}-fashion-mnist.safetensors"


def register(subparsers) -> None:
    quant = subparsers.add_parser("quant", help="mixed-precision post-training quantization of vision transformers")
    sub = quant.add_subparsers(dest="quant_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "train-vit",
        help="train a small timm ViT / DeiT / Swin on Fashion-MNIST into one safetensors file",
        description="Train a timm vision transformer sized for 28x28 Fashion-MNIST and save it as one safetensors "
                    "file with its architecture in the metadata, plus a loss curve (PNG + JSON) beside it.",
    )
    p.add_argument("--arch", default="vit", help="vit | deit | swin")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training images (default 3)")
    p.add_argument("--out", default=None, help="checkpoint path (.safetensors; default: "
                                                 "~/.cache/memfit/quant/<arch>-fashion-mnist.safetensors)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    p.add_argument("--teacher", default=None, help="deit: checkpoint whose predictions train the distillation head "
                                                    "(DeiT hard distillation; default: the labels)")
    p.add_argument("--max-train", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    p.add_argument("--tiny", action="store_true", help="a test-sized model (seconds to train)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=guard(run_train_vit))

    q = sub.add_parser(
        "vit", help="mixed-precision PTQ of a ViT/DeiT/Swin checkpoint; top-1, bits per layer, packed weight bytes",
        description="Allocate per-layer bits (lrp-zplus, lrp, sensitivity, hessian, context, uniform, random) under an average-bit "
                    "budget, quantize with RepQ-style clipped channel-wise post-LayerNorm activations, pack the "
                    "weights and evaluate on the 10k Fashion-MNIST test images.")
    _add_quant_args(q)
    q.add_argument("--plot", default=None, metavar="PNG", help="draw per-layer importance and bits")
    q.set_defaults(func=guard(run_quant_vit))
    e = sub.add_parser("export", help="quantize as `quant vit` does and write the packed low-bit safetensors file",
                       description="Quantize a checkpoint and write every layer's weights packed at its bit width "
                                   "(2, 3, 4, 6, 8) with their scales into one safetensors file.")
    _add_quant_args(e)
    e.add_argument("--out", required=True, help="packed model path (.safetensors)")
    e.set_defaults(func=guard(run_export))


def _add_quant_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", required=True, help="checkpoint (.safetensors from train-vit, or timm's with config.json)")
    # lrp-zplus by default: lrp's epsilon rules do not conserve relevance on deeper-trained models (docs/quant.md)
    q.add_argument("--allocator", default="lrp-zplus",
                   help="lrp-zplus (default) | lrp | sensitivity | hessian | context | uniform | random")
    q.add_argument("--avg-bits", type=float, default=4.0,
                   help="parameter-weighted average weight bits, at most 8 (default 4; the 8-bit patch embedding "
                        "and head count toward it)")
    q.add_argument("--act-bits", type=int, default=None,
                   help="every activation at this width: 2, 3, 4, 6 or 8 (the patch embedding's and head's inputs "
                        "stay at 8)")
    q.add_argument("--avg-act-bits", type=float, default=None,
                   help="allocate activation bits too, under this average weighted by the elements each width "
                        "quantizes (a layer's input; qkv's also sets q/k/v and the softmax) (when --act-bits is "
                        "omitted; default 4)")
    q.add_argument("--calib", type=int, default=256, help="calibration images drawn from the training set")
    q.add_argument("--seed", type=int, default=0, help="calibration draw (and the random allocator)")
    q.add_argument("--per-tensor-ln", action="store_true",
                   help="quantize post-LayerNorm activations per tensor instead of clipped channel-wise")
    q.add_argument("--attention-rule", default="cp", help="LRP softmax rule for the lrp allocators: cp | attnlrp")
    q.add_argument("--max-test", type=int, default=None, help="evaluate on the first this many test images")
    q.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    q.add_argument("--json", action="store_true", help="print one JSON object with the results on stdout")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be positive (got {threads})")
        torch.set_num_threads(threads)


def run_train_vit(args: argparse.Namespace) -> int:
    if args.arch not in ARCH_CHOICES:
        raise ValueError(f"unknown architecture {args.arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    out = Path(args.out) if args.out else default_checkpoint(args.arch)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors (got {out})")
    output_path(out, "--out")  # before the training, which a path that cannot be written would otherwise throw away
    distinct_output(out, "--out", ("--teacher", args.teacher))  # the student saved over its teacher
    _set_threads(args.threads)
    from memfit.train.local.data import load_fashion_mnist

    from .checkpoint import save_checkpoint
    from .train import TrainViTConfig, plot_loss, train_vit

    cfg = TrainViTConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         max_train=args.max_train, max_steps=args.max_steps, tiny=args.tiny, teacher=args.teacher,
                         data_dir=args.data_dir)
    cfg.validate()  # before loading any data
    data = load_fashion_mnist(args.data_dir)
    with _progress(not args.no_progress, args.arch) as progress:
        model, result = train_vit(cfg, data, progress)
    summary = result.to_json()
    summary.update(checkpoint=str(out), loss_json=str(out.with_suffix(".loss.json")),
                   loss_png=str(out.with_suffix(".loss.png")))
    save_checkpoint(out, model, result.spec, {k: summary[k] for k in ("final_test_accuracy", "steps", "config")})
    Path(summary["loss_json"]).write_text(json.dumps(summary, indent=2))
    plot_loss(result, summary["loss_png"])
    print(f"{args.arch}: test top-1 {summary['final_test_accuracy']:.4f} after {result.steps} steps "
          f"({', '.join(f'{s:.0f}' for s in result.epoch_seconds)} s per epoch); saved {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0


def _quant(args: argparse.Namespace, out: str | None, suffixes: tuple[str, ...] | None = None):
    from .pipeline import QuantRun, run_quant

    if out:  # before the quantization, which a path that cannot be written would otherwise throw away
        output_path(out, "--plot" if suffixes else "--out", suffixes)
    _set_threads(args.threads)
    avg_act = args.avg_act_bits if args.avg_act_bits is not None or args.act_bits is not None else 4.0
    cfg = QuantRun(model=args.model, allocator=args.allocator, avg_bits=args.avg_bits, act_bits=args.act_bits,
                   avg_act_bits=avg_act, calib=args.calib, seed=args.seed, channelwise=not args.per_tensor_ln,
                   attention_rule=args.attention_rule, data_dir=args.data_dir, max_test=args.max_test)
    with _progress(not args.no_progress, "quantizing") as progress:
        return run_quant(cfg, progress=progress)


def _report(args: argparse.Namespace, result: dict) -> None:
    print(f"{result['allocator']}: top-1 {result['top1']:.4f} (fp32 {result['fp_top1']:.4f}) at "
          f"W{result['avg_weight_bits']:.2f}/A{result['avg_act_bits']:.2f}; weights {result['weight_bytes']} B "
          f"packed vs {result['fp_weight_bytes']} B fp32", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


def run_quant_vit(args: argparse.Namespace) -> int:
    result, _, _ = _quant(args, args.plot, PLOT_SUFFIXES)
    if args.plot:
        from .pipeline import plot_allocation

        plot_allocation(result, args.plot)
        result["plot"] = args.plot
    _report(args, result)
    return 0


def run_export(args: argparse.Namespace) -> int:
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors (got {args.out})")
    # before the quantization: the packed file written over the fp32 checkpoint it was made from loses that
    distinct_output(args.out, "--out", ("--model", args.model))
    result, packed, spec = _quant(args, args.out)
    from .export import save_packed

    keep = ("top1", "fp_top1", "avg_weight_bits", "avg_act_bits", "weight_bytes", "allocator", "budget")
    save_packed(args.out, packed, spec, {k: result[k] for k in keep})
    result["out"] = args.out
    result["file_bytes"] = Path(args.out).stat().st_size
    _report(args, result)
    return 0


class _progress:
    """A rich progress bar on stderr as a context manager yielding the callback (or None when hidden)."""

    def __init__(self, show: bool, label: str):
        self.show, self.label, self.bar = show, label, None

    def __enter__(self):
        from memfit.progress import bar_console

        console = bar_console(self.show)
        if console is None:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=None)

        def update(label: str, done: int, total: int) -> None:
            self.bar.update(task, description=label, completed=done, total=total)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
