"""`memfit plan`: plan a network's scratchpad (`memfit plan --model NAME --scratchpad SIZE --out PLAN.json`)
and check a plan file (`memfit plan validate PLAN.json`)."""
from __future__ import annotations

import argparse
import json
import sys

PLANNER_CHOICES = ("auto", "whole", "exact", "heuristic", "baseline-topo", "baseline-topo-largest", "baseline-memory",
                   "baseline-belady", "baseline-belady-memory",
                   "baseline-memory-largest")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="plan operator order, scratchpad addresses and spills of a DNN accelerator (COSMA-style)",
        description="memfit plan --model NAME|FILE.onnx --scratchpad SIZE --out PLAN.json | memfit plan validate FILE",
    )
    p.add_argument("action", nargs="?", metavar="validate", help="'validate' to check a plan file")
    p.add_argument("file", nargs="?", help="plan file to validate")
    p.add_argument("--model", help="torchvision/timm name, a memfit built-in (bert_base_encoder, bert_tiny_encoder, "
                                    "darts_v2_cifar, randwire_ws, ...), or an .onnx file")
    p.add_argument("--scratchpad", default="mid",
                   help="bytes, or e.g. 512KiB/1.5MiB, or min-feasible | min-peak | mid (default: mid)")
    p.add_argument("--out", help="write the plan JSON here")
    p.add_argument("--planner", default="auto", choices=PLANNER_CHOICES,
                   help="auto (default): exact up to 60 ops, whole up to 2000, heuristic above; baseline-*: the "
                        "rival policies (docs/plan-format.md)")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds for the whole plan (default 30): on the wall "
                   "clock the call returns within it + 1 s (5%% above 20 s), the seeds it starts from aside")
    p.add_argument("--clock", choices=("wall", "work"), default="wall",
                   help="what --time-limit counts: wall time, or work (CP-SAT's deterministic time and the "
                        "planner's CPU time), which a loaded machine does not shrink (stops at 3x in wall time)")
    p.add_argument("--batch", type=int, default=1, help="the input's batch dimension (default 1)")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 | int8 (floating tensors)")
    p.add_argument("--input-shape", help="input shape without batch, e.g. 3,224,224")
    p.add_argument("--weights", choices=("resident", "streamed"), default="resident",
                   help="resident: weights occupy the scratchpad while used (COSMA); streamed: they bypass it")
    p.add_argument("--tile", action="store_true",
                   help="split operators that do not fit the scratchpad into tiles (memfit.plan.tiling)")
    p.add_argument("--workers", type=int, default=2, help="CP-SAT worker threads (default 2)")
    p.add_argument("--plot", help="draw the scratchpad over time to this PNG")
    p.add_argument("--no-split-bound", action="store_true",
                   help="skip the span and split lower bounds (a share of the time limit where the other bounds leave a gap)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (planner, status, bound, gap, each bound's part, traffic) on stdout; "
                        "the rest goes to stderr")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on stderr while planning: elapsed time against --time-limit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memfit.plan.errors import PlanError

    try:
        if args.action is not None:
            if args.action != "validate" or not args.file:
                raise PlanError("usage: memfit plan validate PLAN.json  (or: memfit plan --model NAME ...)")
            return _validate(args.file, args.json)
        if not args.model:
            raise PlanError("--model is required (a torchvision/timm name, bert_base_encoder, or an .onnx file)")
        return _plan(args)
    except PlanError as exc:
        from memfit.errors import refuse

        return refuse(args, exc)  # --json: still exactly one object on stdout
    except KeyboardInterrupt:  # Ctrl-C in a long solve: one line, the shell's status for SIGINT
        from memfit.errors import interrupted

        return interrupted(args)


def _validate(path: str, as_json: bool = False) -> int:
    from memfit.plan.validate import load_plan

    plan = load_plan(path)
    if as_json:
        print(json.dumps({"file": path, "valid": True, "model": plan.graph.model, "ops": len(plan.order),
                          "placements": len(plan.placements), "traffic": plan.traffic or {}}))
        return 0
    print(f"{path}: valid memfit.plan/v1 plan for {plan.graph.model!r} ({len(plan.order)} ops, "
          f"{len(plan.placements)} placements)")
    _print_traffic(plan.traffic or {})
    return 0


def _plan(args: argparse.Namespace) -> int:
    import math
    import os
    import time

    import torch

    from memfit.errors import PLOT_SUFFIXES, command_name, distinct_output, output_path
    from memfit.plan.analysis import resolve_scratchpad, scratchpad_sizes, without_weights
    from memfit.plan.errors import PlanError, SizeParseError
    from memfit.plan.graph import graph_from_name
    from memfit.plan.planner import PlanOptions, make_plan
    from memfit.plan.progress import solve_progress
    from memfit.plan.sizes import format_size, parse_size

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    say = sys.stderr if args.json else sys.stdout  # --json: stdout holds the one JSON object only
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.split(","))
        except ValueError:
            raise PlanError(f"--input-shape {args.input_shape!r}: use comma-separated integers, e.g. 3,224,224") from None
        if not shape or min(shape) < 1:
            raise PlanError(f"--input-shape {args.input_shape!r}: every dimension must be at least 1, e.g. 3,224,224")
    # also NaN; inf planned and wrote "wall_limit_s": Infinity, which is not JSON, to stdout and the plan file
    if args.time_limit is not None and not 0 <= args.time_limit < math.inf:
        raise PlanError(f"--time-limit must be a finite number of seconds >= 0, got {args.time_limit}")
    if args.batch < 1:
        raise PlanError("--batch must be at least 1")
    # (a batch whose input passes 64-bit sizes: refused where the example input is built, zoo._example)
    if args.workers < 1:
        raise PlanError(f"--workers must be at least 1 (got {args.workers})")
    if args.workers > 2**31 - 1:  # CP-SAT's num_workers is an int32: larger was a TypeError traceback in the solve
        raise PlanError(f"--workers must be at most {2**31 - 1}, CP-SAT's limit (got {args.workers})")
    cpus = os.cpu_count() or 1
    if args.workers > cpus:  # allowed (CP-SAT runs them in turn), but each worker gets a share of a CPU
        print(f"{command_name(args)}: warning: --workers {args.workers} is more than this machine's {cpus} CPUs; "
              f"the CP-SAT workers share them", file=sys.stderr)
    from memfit.plan.analysis import SCRATCHPAD_KEYWORDS

    if args.scratchpad.strip().lower() not in SCRATCHPAD_KEYWORDS:  # a size: checked before the graph's extraction
        try:
            parse_size(args.scratchpad)
        except SizeParseError as exc:
            raise SizeParseError(f"--scratchpad: {exc}") from None
    try:  # before the planning, which a path that cannot be written would otherwise throw away
        for option, path, suffixes in (("--out", args.out, None), ("--plot", args.plot, PLOT_SUFFIXES)):
            if path:
                output_path(path, option, suffixes)
        # one file for both: the plot was written over the plan; an .onnx --model is the user's input
        model_file = [("--model", args.model)] if os.path.isfile(args.model) else []
        distinct_output(args.plot, "--plot", ("--out", args.out), *model_file)
        distinct_output(args.out, "--out", *model_file)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    t0 = time.perf_counter()
    g = graph_from_name(args.model, batch=args.batch, dtype=args.dtype, input_shape=shape)
    if args.weights == "streamed":
        g = without_weights(g)
    sizes = scratchpad_sizes(g)
    cap = resolve_scratchpad(g, args.scratchpad)
    # the extracted graph's sizes, printed before tiling: they were printed after it, under the tiled graph's name
    # and op count, as if 'min-feasible 1.00 MiB' held for a graph that tiling had made fit 256 KiB
    print(f"{g.model}: {len(g.ops)} ops, {len(g.tensors)} tensors, extracted in {time.perf_counter() - t0:.1f} s; "
          f"sizes: " + ", ".join(f"{k} {format_size(v)}" for k, v in sizes.as_dict().items()), file=say)
    if args.tile:
        from memfit.plan.tiling import tile_graph

        g, tiles = tile_graph(g, cap)
        if tiles:
            print(f"tiled {len(tiles)} operators that do not fit (up to {max(tiles.values())} tiles each): "
                  f"{g.model}: {len(g.ops)} ops, {len(g.tensors)} tensors", file=say)
    print(f"scratchpad: {cap} bytes ({format_size(cap)}), planner: {args.planner}", file=say)
    opts = PlanOptions(planner=args.planner, time_limit_s=args.time_limit, num_workers=args.workers,
                       split_bound_share=0.0 if args.no_split_bound else PlanOptions.split_bound_share,
                       clock=args.clock)
    with solve_progress(not args.no_progress, args.planner, args.time_limit, args.clock) as progress:
        plan = make_plan(g, cap, opts, progress=progress)
    s = plan.solver
    gap = "n/a" if s.gap is None else f"{100 * s.gap:.1f}%"
    bound = "n/a" if s.bound_bytes is None else str(s.bound_bytes)
    print(f"planner {plan.planner}: status {s.status}, time {s.time_s:.2f} s, bound {bound} bytes, gap {gap}", file=say)
    lb = s.details.get("lower_bound")
    if lb:  # which bound is the largest, each one's bytes: the gap is plan against the best of them
        print("  bounds (bytes): " + ", ".join(f"{k} {v['bytes']}" + (" *" if k == lb["best_part"] else "")
                                               for k, v in lb["parts"].items()), file=say)
    asked = s.details.get("requested_planner")
    if asked and asked != plan.planner:  # say so: the requested planner did not produce this plan
        why = "it meets the lower bound, so there was nothing to search for" if s.details.get("seed_meets_bound") \
            else f"the {asked} planner found nothing better"
        print(f"  the seed {plan.planner}, returned as it is: {why}", file=say)
    _print_traffic(plan.traffic, say)
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}", file=say)
    if args.plot:
        from memfit.plan.plot import plot_plan

        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}", file=say)
    if args.json:
        print(json.dumps({"model": g.model, "ops": len(g.ops), "scratchpad_bytes": cap, "planner": plan.planner,
                          "requested_planner": asked, "status": s.status, "time_s": round(s.time_s, 3),
                          "non_compulsory_bytes": plan.traffic["non_compulsory_bytes"], "bound_bytes": s.bound_bytes,
                          "gap": s.gap, "proven_by": s.details.get("proven_by"), "lower_bound": lb,
                          "clock": s.details.get("clock", {"clock": "wall"}),
                          "traffic": plan.traffic, "out": args.out}))
    return 0


def _print_traffic(tr: dict, file=None) -> None:
    print("traffic (bytes): " + json.dumps(tr), file=file or sys.stdout)
