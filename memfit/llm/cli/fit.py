"""`memfit fit`: the predicted memory breakdown of a model, context and batch (memfit.llm.engine.fit)."""
from __future__ import annotations

import json

from memfit.errors import guard


def cmd_fit(args) -> int:
    from memfit.llm.engine.fit import predict, fit_report
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.config import ModelConfig, parse_dtype
    from memfit.memory.budget import Tier, resolve_budget

    cfg = ModelConfig.from_dir(resolve_model_path(args.model))
    dtype = parse_dtype(args.dtype) if args.dtype else parse_dtype(cfg.torch_dtype)
    # Budgets take the same forms as everywhere else: bytes, or a fraction of the memory available now.
    kv_budget = resolve_budget(args.kv_budget, Tier.DEVICE, "cpu") if args.kv_budget else None
    limit = resolve_budget(args.memory, Tier.DEVICE, "cpu") if args.memory else None
    b = predict(cfg, dtype, args.context, args.batch, args.chunk, kv_budget, limit)
    if args.json:
        print(json.dumps({"model": args.model, "dtype": str(dtype).replace("torch.", ""), "context": args.context,
                          "batch": args.batch, **b.to_dict()}))
    else:
        print(fit_report(cfg, dtype, args.context, args.batch, kv_budget, limit, args.chunk))
    return 0 if b.fits else 3


def register(sub) -> None:
    p = sub.add_parser("fit", help="predict the memory breakdown for a model, context and batch")
    p.add_argument("--model", default="memfit-tiny")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence (prompt + output)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (max batched tokens per step)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-budget", default=None, help="bytes ('512MiB') or a fraction of the available memory ('0.3', '30%%')")
    p.add_argument("--memory", default=None, help="total memory limit to check against: bytes ('8GiB') or a fraction ('0.5')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=guard(cmd_fit))
