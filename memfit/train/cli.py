"""`memfit train ...` commands. Registration is cheap: torch and friends load inside the command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHOD_CHOICES = ("tpsgd", "bp", "drtp", "dfa")


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train models under a memory budget")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "local",
        help="backprop-free local learning (tpSGD) vs backprop, DRTP, DFA, with measured training memory",
        description="Train with local targets (tpSGD) or a baseline and print one JSON object with accuracy, "
                    "time and measured peak memory. Progress goes to stderr.",
    )
    p.add_argument("--json", action="store_true",
                   help="the result is one JSON object on stdout with or without it; with it a refusal is one too "
                        "({\"error\": ...}), without it a refusal is only its message on stderr")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | digits")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--model", default="mlp", help="mlp | cnn | rnn")
    p.add_argument("--depth", type=int, default=3, help="weight layers in all (hidden blocks + output layer)")
    p.add_argument("--width", type=int, default=None, help="units (mlp), channels (cnn), state size (rnn)")
    p.add_argument("--method", default="tpsgd", help="one or more of tpsgd,bp,drtp,dfa (comma-separated)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", help="adam | sgd")
    p.add_argument("--local-loss", default=None,
                   help="tpSGD local loss: ce (default) | mse | l1 | contrast (cross-entropy of the activation's scores "
                        "against every class's projected target; --target-scale is its inverse temperature)")
    p.add_argument("--activation", default="relu", help="relu | tanh (mlp and cnn)")
    p.add_argument("--rnn-cell", default="gru", help="elman | gru | lstm")
    p.add_argument("--target-scale", type=float, default=1.0,
                   help="scale of the random projections P_i (contrast: 0.2-0.3 worked best)")
    p.add_argument("--time-weighting", default="square",
                   help="recurrent local rules: weight of each step's loss (square | linear | uniform | last)")
    p.add_argument("--rnn-window", type=int, default=1,
                   help="recurrent local rules: backprop through time within one layer over this many steps "
                        "(1: none; never across layers)")
    p.add_argument("--remember-bias", type=float, default=0.0,
                   help="rnn gru/lstm: add this to the update/forget-gate bias at init (the state leaks slower)")
    p.add_argument("--rnn-credit", default="step",
                   help="rnn local rules at --rnn-window 1: step (one step's credit) | leak (the signal at the last "
                        "step sent back along the GRU's leak z*h, recomputed: window-1 memory; needs "
                        "--rnn-cell gru --time-weighting last)")
    p.add_argument("--conv-grid", type=int, default=1,
                   help="tpSGD cnn: local target on g x g region means of each channel (1: channel means)")
    p.add_argument("--no-fused", action="store_true", help="tpSGD/DRTP: plain autograd instead of the lean fused step")
    p.add_argument("--regenerate-projections", action="store_true",
                   help="regenerate the random projections from their seeds at each use instead of storing them")
    p.add_argument("--max-train", type=int, default=None, help="train on a seeded subset of this many examples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw test accuracy per epoch for each method")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_local)
    _register_finetune(sub)


def _register_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="full fine-tuning of a Llama-family model with its state offloaded to host memory or an SSD",
        description="Fine-tune all weights (AdamW, fp32 masters, bf16 compute) on ShareGPT JSON or chat JSONL, "
                    "with parameters, gradients and optimizer states in the chosen tier and one of two "
                    "host-memory designs (ZeRO-Infinity's or MemAscend's). --json prints one result object.",
    )
    p.add_argument("--model", required=True, help="local model directory (safetensors) or a bundled model name")
    p.add_argument("--data", required=True, help="ShareGPT .json or chat .jsonl ({\"messages\": [...]} per line)")
    p.add_argument("--offload", default="none", choices=("none", "host", "ssd"),
                   help="where parameters, gradients' master copies and Adam states live")
    p.add_argument("--ssd-dir", default=None, help="swap directory for --offload ssd (on an SSD; O_DIRECT where possible)")
    p.add_argument("--host-memory", default="memascend",
                   choices=("zero-infinity", "zero-infinity-tuned", "zero-infinity-pipelined", "memascend"),
                   help="host-memory design: ZeRO-Infinity's buffer policies (at DeepSpeed's defaults; -tuned: "
                        "sub_group_size at its smallest; -pipelined: also pipeline_read/pipeline_write) or MemAscend's")
    p.add_argument("--memory-budget", default=None,
                   help="host memory the run may plan for: bytes ('8GiB') or a fraction of the available memory "
                        "('0.5' or '50%%'), as every command's --memory-budget; below the minimum it stops with "
                        "the breakdown")
    p.add_argument("--steps", type=int, default=10, help="total optimizer steps, counted from step 0 (also on --resume)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512, help="examples are cut to this many tokens")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 | float16 (loss scaling) | float32")
    p.add_argument("--grad-checkpointing", nargs="?", const="device", default=None, choices=("device", "host"),
                   help="recompute each layer in backward from its saved input; 'host' keeps those inputs in "
                        "host memory (offloaded runs always recompute)")
    p.add_argument("--prefetch", type=int, default=2, help="layers fetched ahead of the compute")
    p.add_argument("--loss-chunk-tokens", type=int, default=None, metavar="N",
                   help="tokens per chunk of the output layer's logits and loss (default: about 16 MiB of "
                        "temporaries per chunk); the whole (tokens x vocabulary) matrix is never held")
    p.add_argument("--save", default=None, metavar="DIR", help="write checkpoints under DIR (and one at the end)")
    p.add_argument("--save-every", type=int, default=0, metavar="K", help="a checkpoint every K steps")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from DIR (a --save DIR or one checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--device", default=None, help="compute device (default: cuda when present, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="loss curve PNG (+ .json beside it); default SAVE/loss.png with --save")
    p.add_argument("--placement", default=None, choices=("local-only", "interleave", "latency-first"),
                   help="NUMA placement of the host-memory state (docs/placement.md): all on the local node, "
                        "striped over every node, or latency-critical groups local up to --local-budget")
    p.add_argument("--local-budget", default=None, metavar="BYTES|N%",
                   help="local-DRAM budget for --placement latency-first: bytes (8GiB) or a share of the state (50%%)")
    p.add_argument("--tier-backend", default=None, choices=("auto", "libnuma", "plain", "simulated"),
                   help="how tiers become memory: libnuma (real nodes; auto picks it where installed), plain "
                        "(no policy), simulated (CXL nodes in software, times modelled); default auto")
    p.add_argument("--local-node", type=int, default=None, help="the fast node (default: the node this runs on)")
    p.add_argument("--slow-nodes", default=None, metavar="LIST",
                   help="the slow tier's nodes, e.g. 2,3 (default: the CPU-less nodes, else the other sockets)")
    p.add_argument("--simulated-cxl", type=int, default=None, metavar="K",
                   help="CXL devices for --tier-backend simulated (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON result object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    import logging

    import torch

    from memfit.llm.models.config import ModelFormatError
    from memfit.memory.aio import SwapSpaceError
    from memfit.errors import PLOT_SUFFIXES, output_dir, output_path, warn_budget_past_memory
    from memfit.memory.budget import Tier, resolve_budget

    from .finetune.budget import BudgetTooSmall
    from .finetune.checkpoint import CheckpointError
    from .finetune.data import DataFormatError
    from .finetune.plot import write_loss_curve
    from .finetune.trainer import MMAP_THRESHOLD, FinetuneConfig, FinetuneError, run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if args.threads is not None:
        if args.threads < 1:
            return _refuse(args, f"--threads must be positive (got {args.threads})")
        torch.set_num_threads(args.threads)
    try:  # the LLM commands' rule: '0.5' and '50%' are a share of the memory available now, not 0 bytes
        budget = resolve_budget(args.memory_budget, Tier.HOST) if args.memory_budget is not None else None
    except ValueError as exc:
        return _refuse(args, f"--memory-budget: {exc}")
    if budget is not None:
        warn_budget_past_memory(args, "--memory-budget", args.memory_budget, budget)
    plot = args.plot or (str(Path(args.save) / "loss.png") if args.save else None)
    try:  # before the training, which a path that cannot be written would otherwise throw away
        if args.save:
            # Checked, not made: the run makes the folder at its first checkpoint (save_checkpoint), and a run
            # refused or stopped before that (bad data, a plan too big, Ctrl-C, a --resume already at --steps)
            # leaves no folder behind, so neither does this check.
            output_dir(args.save, "--save", keep=False)
        if plot:  # write_loss_curve makes its folder too (and for the default, SAVE/loss.png, that is --save's)
            output_path(plot, "--plot" if args.plot else "--save (its loss.png)", PLOT_SUFFIXES, keep=False)
    except ValueError as exc:
        return _refuse(args, str(exc))
    from memfit.llm.engine.config import resolve_device

    try:  # a CUDA device that is not there: one line, not torch's traceback
        device = str(resolve_device(args.device or "auto"))
    except ValueError as exc:
        return _refuse(args, str(exc))
    placement = None
    if args.placement is not None:
        from .finetune.placement import PlacementConfig

        try:
            slow = [int(x) for x in args.slow_nodes.split(",") if x.strip()] if args.slow_nodes else None
        except ValueError:
            return _refuse(args, f"--slow-nodes takes node numbers separated by commas (got {args.slow_nodes!r})")
        placement = PlacementConfig(args.placement, args.local_budget, args.tier_backend or "auto", args.local_node,
                                    slow, 1 if args.simulated_cxl is None else args.simulated_cxl)
    elif args.local_budget is not None:
        return _refuse(args, "--local-budget needs --placement latency-first")
    else:  # the tier options mean nothing without a placement: say so rather than run without them
        given = [flag for flag, value in (("--tier-backend", args.tier_backend), ("--local-node", args.local_node),
                                          ("--slow-nodes", args.slow_nodes), ("--simulated-cxl", args.simulated_cxl))
                 if value is not None]  # None: not given (the defaults apply above, with --placement)
        if given:
            return _refuse(args, f"{', '.join(given)} needs --placement local-only|interleave|latency-first")
    if args.ssd_dir is not None and args.offload != "ssd":
        return _refuse(args, f"--ssd-dir needs --offload ssd (got --offload {args.offload}, which writes no swap)")
    cfg = FinetuneConfig(
        model=args.model, data=args.data, offload=args.offload, ssd_dir=args.ssd_dir, host_memory=args.host_memory,
        memory_budget=budget, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        weight_decay=args.weight_decay, dtype=args.dtype, grad_checkpointing=args.grad_checkpointing,
        prefetch_depth=args.prefetch, loss_chunk_tokens=args.loss_chunk_tokens, save=args.save,
        save_every=args.save_every, resume=args.resume,
        seed=args.seed, device=device, placement=placement, mmap_threshold=MMAP_THRESHOLD,
    )
    try:
        result = _finetune_with_progress(cfg, run, not args.no_progress)
    except (FinetuneError, DataFormatError, CheckpointError, BudgetTooSmall, SwapSpaceError, ModelFormatError,
            ValueError) as exc:
        return _refuse(args, str(exc))
    except OSError as exc:  # --ssd-dir or --save where no folder can be made or written
        where = f"{exc.filename}: " if exc.filename else ""
        return _refuse(args, f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return _interrupted(args, args.save)
    out = result.to_json()
    if plot:
        out["plot"] = str(write_loss_curve(result.all_losses, plot, f"{args.model} {args.offload} {args.host_memory}",
                                           result.skipped_steps))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"steps {result.start_step}..{result.start_step + len(result.losses)}: loss "
              f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB; "
              f"allocator peak in the last step {result.allocator_peak_bytes / 2**20:.0f} MiB"
              if result.losses else "nothing to do: the checkpoint is already at --steps")
        if result.placement is not None:
            print(result.placement["numastat"], file=sys.stderr)
    return 0


def _refuse(args: argparse.Namespace, message: str) -> int:
    """A user's mistake: memfit.errors.refuse (one line on stderr, exit 2, with --json the one JSON object on stdout),
    as the other commands do."""
    from memfit.errors import refuse

    return refuse(args, message)


def _interrupted(args: argparse.Namespace, save: str | None = None) -> int:
    """Ctrl-C: memfit.errors.interrupted, naming the checkpoints to resume from where there is one."""
    from memfit.errors import interrupted

    saved = save is not None and (Path(save) / "latest").is_file()  # a complete checkpoint (checkpoint.py)
    kept = f"; the checkpoints written under {save} are kept (--resume {save})" if saved else ""
    return interrupted(args, f"interrupted{kept}")


def _finetune_with_progress(cfg, run, show: bool):
    from memfit.progress import bar_console

    console = bar_console(show)
    if console is None:
        return run(cfg)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("", total=cfg.steps)

        def progress(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, description=f"loss {loss:.4f}")

        return run(cfg, progress)


def run_local(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_CHOICES]
    if not methods or bad:
        return _refuse(args, f"unknown method {', '.join(bad) or repr(args.method)}; choose from "
                             f"{', '.join(METHOD_CHOICES)} (comma-separated for several)")
    import torch

    from memfit.errors import PLOT_SUFFIXES, output_path

    from .local.data import load_dataset
    from .local.errors import DatasetMissingError, LocalTrainingError
    from .local.trainer import TrainConfig, environment, train

    if args.threads is not None:
        if args.threads < 1:
            return _refuse(args, f"--threads must be positive (got {args.threads})")
        torch.set_num_threads(args.threads)
    try:
        if args.plot:  # before the training, which a path that cannot be written would otherwise throw away
            output_path(args.plot, "--plot", PLOT_SUFFIXES)
        configs = [
            TrainConfig(
                dataset=args.dataset, model=args.model, depth=args.depth, width=args.width, method=m,
                epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                optimizer=args.optimizer, activation=args.activation,
                **({"local_loss": args.local_loss} if args.local_loss else {}),  # else TrainConfig's (the one) default
                rnn_cell=args.rnn_cell, store_projections=not args.regenerate_projections,
                max_train=args.max_train, data_dir=args.data_dir, target_scale=args.target_scale,
                time_weighting=args.time_weighting, rnn_window=args.rnn_window, fused_local=not args.no_fused,
                remember_bias=args.remember_bias, rnn_credit=args.rnn_credit, conv_grid=args.conv_grid,
            )
            for m in methods
        ]
        for cfg in configs:
            cfg.validate()  # fail on bad sizes before loading any data
        data = load_dataset(args.dataset, args.seed, args.data_dir)
        runs = [_train_with_progress(cfg, data, train, not args.no_progress) for cfg in configs]
    except (LocalTrainingError, DatasetMissingError, ValueError) as exc:
        return _refuse(args, str(exc))
    except KeyboardInterrupt:
        return _interrupted(args)
    except RuntimeError as exc:  # torch's CPU allocator refusing a tensor: a --width/--batch-size too large here
        if "can't allocate memory" not in str(exc):
            raise
        return _refuse(args, f"not enough memory for this model: {str(exc).splitlines()[0]}; lower --width, "
                             "--depth or --batch-size")
    if args.plot:
        from .local.plot import plot_accuracy_curves

        plot_accuracy_curves(runs, args.plot, f"{args.dataset} {args.model} depth {args.depth}")
    if len(runs) == 1:
        out = dict(runs[0], environment=environment())
    else:  # several methods: one object, one entry per method, plus a short side-by-side summary
        out = {
            "methods": methods, "model": args.model, "dataset": args.dataset, "runs": runs,
            "summary": {r["method"]: {k: r[k] for k in ("test_accuracy", "train_seconds", "allocator_peak_bytes",
                                                         "peak_overhead_bytes", "peak_training_bytes")} for r in runs},
            "environment": environment(),
        }
    if args.plot:
        out["plot"] = args.plot
    print(json.dumps(out, indent=2))
    return 0


def _train_with_progress(cfg, data, train, show: bool) -> dict:
    if not show:
        return train(cfg, data).to_json()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from memfit.progress import bar_console

    console = bar_console()
    if console is not None:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(cfg.method, total=None)

            def progress(label: str, done: int, total: int) -> None:
                bar.update(task, description=label, completed=done, total=total)

            result = train(cfg, data, progress)
    else:  # a bar to a file or pipe draws nothing and leaves one blank line; the summary below still goes there
        result = train(cfg, data)
    print(f"{cfg.method}: test accuracy {result.test_accuracy:.4f} in {result.train_seconds:.1f} s, "
          f"allocator peak in a step {result.allocator_peak_bytes / 2**20:.2f} MiB "
          f"(saved + gradients {result.peak_overhead_bytes / 2**20:.2f} MiB)", file=sys.stderr)
    return result.to_json()
