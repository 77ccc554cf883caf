"""The runtime's share of the memory ledger, measured once per machine and build, then cached.

Running a model pages in library code (libtorch's kernels, oneDNN, memfit's C++ kernels, the tokenizers
library), fills allocator pools and oneDNN's primitive caches. None of that follows from the model's shape,
but all of it is memory the process adds after torch and memfit are imported, so a budget that bounds the
process must count it. We measure it instead of guessing: a fresh process imports torch and memfit (that RSS
is the `runtime_baseline_bytes`, reported separately), builds the bundled memfit-tiny with random weights in the same dtype (its real tokenizer and chat template
included), runs it
through the engine with the same backends for two rounds of batched requests (greedy and sampled), and
subtracts what `accounting` already counts for that model (weights, tokenizer, step, committed KV) from
its peak RSS growth. The rest is `runtime_bytes`.

    python -m memfit.llm.engine.calibrate --dtype bfloat16 --cpu-linear blocked --json

The result is cached in $MEMFIT_CACHE/runtime.json (default ~/.cache/memfit), keyed by memfit's version and a
digest of its engine code, torch's version, the CPU model, and the device, dtype and backend choices, so each
machine pays the ~30 s (3.4 min measured on a loaded 2-core machine) once per build; runtime_bytes says so on stderr
while it measures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from memfit.llm.engine.calibration_cache import cache_key, cache_path, read_cache, write_cache_entry

CALIBRATING_ENV = "MEMFIT_CALIBRATING"  # set in the calibration process: its own engine reserves no runtime


CALIBRATION_BATCHES = (1, 8)  # the runtime's share is measured at both and interpolated (allocator pools grow with it)
# Each is measured this many times in fresh processes and the largest kept. The same run varies by up to 3 MB from
# process to process (allocator pools, when malloc trims; measured on a 2-core machine: 6.4-9.6 MB at batch 8), and
# a budget wants the upper end: three draws could all fall low (a 56 MiB budget then peaked at 1.08x), five seldom
# do. Adding the draws' spread as well overshot `memfit fit`'s prediction of the peak by 15%.
CALIBRATION_REPEATS = 5


def runtime_bytes(device_type: str, dtype: str, cpu_linear: str | None, cpu_kernels: bool, batch: int = 8) -> dict:
    """{"runtime_bytes", "runtime_low_bytes", "runtime_baseline_bytes"} for these choices and a decode batch of
    `batch`: from the cache, or measured now in fresh processes (and cached). Zeros inside a calibration run itself.
    runtime_bytes is the most any draw held (what a budget counts); runtime_low_bytes the least, so a reader can
    see how far below the count one run may land.

    Measured at batch 1 and 8; in between linear, past 8 the batch-8 figure (what grows with the batch beyond
    that, activations and KV, the ledger counts itself)."""
    if os.environ.get(CALIBRATING_ENV):
        return {"runtime_bytes": 0, "runtime_low_bytes": 0, "runtime_baseline_bytes": 0}
    key = cache_key(device_type, dtype, cpu_linear, cpu_kernels)
    entry = read_cache().get(key)
    if entry is None or "low_by_batch" not in entry:
        by_batch, low_by_batch = {}, {}
        runs = len(CALIBRATION_BATCHES) * CALIBRATION_REPEATS
        # A first budgeted run on a machine spends this in silence otherwise (3.4 min measured on a loaded 2-core
        # machine): say what it is waiting for, on stderr, so a `--json` stdout stays one object.
        print(f"memfit: measuring the runtime's memory for the budget ({device_type}, {dtype}, {cpu_linear}): "
              f"{runs} short runs in fresh processes, once per machine and memfit build; cached in {cache_path()}",
              file=sys.stderr, flush=True)
        done_runs = 0
        for b in CALIBRATION_BATCHES:
            cmd = [sys.executable, "-m", "memfit.llm.engine.calibrate", "--device", device_type, "--dtype", dtype,
                   "--cpu-linear", str(cpu_linear or "none"), "--batch", str(b), "--json"]
            cmd += [] if cpu_kernels else ["--no-cpu-kernels"]
            draws = []
            for _ in range(CALIBRATION_REPEATS):
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, CALIBRATING_ENV: "1"},
                                      timeout=600)
                if done.returncode != 0:
                    raise RuntimeError(f"measuring the runtime's memory failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
                result = json.loads(done.stdout)
                draws.append(int(result["runtime_bytes"]))
                done_runs += 1
                print(f"memfit: runtime memory run {done_runs}/{runs} done", file=sys.stderr, flush=True)
            by_batch[str(b)], low_by_batch[str(b)] = max(draws), min(draws)
        entry = {"by_batch": by_batch, "low_by_batch": low_by_batch,
                 "runtime_baseline_bytes": int(result["runtime_baseline_bytes"])}
        write_cache_entry(key, entry)
    lo, hi = CALIBRATION_BATCHES
    t = min(max((batch - lo) / (hi - lo), 0.0), 1.0)

    def at_batch(figures: dict) -> int:
        return int(round(figures[str(lo)] + t * (figures[str(hi)] - figures[str(lo)])))

    return {"runtime_bytes": at_batch(entry["by_batch"]), "runtime_low_bytes": at_batch(entry["low_by_batch"]),
            "runtime_baseline_bytes": entry["runtime_baseline_bytes"]}


def _write_tiny_model(root: Path, dtype: str) -> Path:
    """The bundled memfit-tiny's architecture, tokenizer and chat template, with random weights in `dtype`: a
    real BPE tokenizer and template, so their libraries' pages are measured too."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from memfit.llm.models.config import ModelConfig
    from memfit.llm.models.llama import LlamaForCausalLM
    from memfit.llm.models.loader import resolve_model_path

    bundled = resolve_model_path("memfit-tiny")
    hf = json.loads((bundled / "config.json").read_text())
    hf["torch_dtype"] = dtype
    (root / "config.json").write_text(json.dumps(hf))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bundled / name).is_file():
            shutil.copy(bundled / name, root / name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf)).to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if hf.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(root / "model.safetensors"))
    return root


def measure(model_dir: Path, device: str, dtype: str, cpu_linear: str, cpu_kernels: bool, batch: int = 8) -> dict:
    """Run the engine on `model_dir` in this process, which must have imported nothing of torch's yet."""
    from memfit.memory.measure import HeldMemoryMeter, rss_bytes

    before_import = rss_bytes()
    import torch

    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams
    from memfit.llm.engine import accounting, arena_accounting, fallback_accounting

    baseline = rss_bytes() - before_import
    cuda = device.startswith("cuda")

    def device_used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    # CPU: the memory the process holds (anonymous, shared, the model's mapped files), not library pages,
    # whose count depends on the page cache (see HeldMemoryMeter); fitcheck measures the same way.
    meter = HeldMemoryMeter(files_under=[model_dir]) if not cuda else None
    base = device_used() if cuda else 0
    peak = kv_max = beside_kv = 0
    with meter if meter is not None else contextlib.nullcontext():
        engine = LLMEngine(EngineConfig(model=str(model_dir), device=device, dtype=dtype, max_num_seqs=batch,
                                        max_model_len=256, kv_budget="256MiB", max_num_batched_tokens=512,
                                        cpu_kernels=cpu_kernels, prepack=cpu_linear != "none",
                                        cpu_linear="auto" if cpu_linear == "none" else cpu_linear))
        if meter is not None:
            beside_kv = meter.checkpoint() - engine.kv.committed_bytes  # building the engine
        g = torch.Generator().manual_seed(0)
        for rnd in range(2):
            for i in range(batch):  # greedy and sampled requests side by side (at batch 1: one round of each)
                params = SamplingParams(max_tokens=96, ignore_eos=True, temperature=0.0 if (i + rnd) % 2 else 0.8,
                                        top_p=0.9, seed=i)
                prompt = torch.randint(1, engine.model_config.vocab_size, (60 + 10 * i,), generator=g).tolist()
                engine.add_request(prompt=engine.tokenizer.decode(prompt), params=params)  # the tokenizer runs too
            while engine.has_unfinished_requests():
                kv_before = engine.kv.committed_bytes
                engine.step()
                # what the process holds beside its KV, step by step: the KV committed moves (pages ahead,
                # cached prefixes, idle reclamation), and the runtime's share must not take its swings for its own.
                # On the CPU the step's own peak comes from the kernel's VmHWM (meter.checkpoint): a sampler
                # misses short peaks, more of them the busier the machine, and a runtime measured low lets a
                # budgeted engine admit KV the process then has no room for. The KV held at that peak is about
                # the more of before and after (finished sequences free theirs at the step's end).
                kv = engine.kv.committed_bytes
                kv_max = max(kv_max, kv)
                now = device_used() - base if cuda else meter.checkpoint()
                beside_kv = max(beside_kv, now - max(kv, kv_before))
                peak = max(peak, now)
    if cuda:
        grown = device_used() - base
    else:
        grown, peak = meter.end_delta_bytes, max(peak, meter.peak_delta_bytes)
    cfg = engine.model_config
    fixed = (accounting.weights_bytes(cfg, engine.dtype, engine.backends.cpu_linear, engine.device.type)
             + accounting.tokenizer_bytes(model_dir)
             + fallback_accounting.shape_cache_bytes(cfg, engine.backends.cpu_linear, 512, engine.device.type,
                                                     head_rows=batch)  # a sampled row a sequence
             + accounting.step_bytes(cfg, engine.dtype, 512, 256, batch, engine.backends.cpu_kernels,
                                     accounting.mlp_row_block(engine.device.type, engine.backends.cpu_linear,
                                                                  engine.dtype), arena=engine.runner.scratch is not None and arena_accounting.LEDGER_USES_ARENA,
                                     packed=fallback_accounting.pads_rows(engine.backends.cpu_linear, engine.device.type)))
    # the peak between two samples is bounded with the most KV ever committed; the end with the KV at the end
    beside_kv = max(beside_kv, peak - kv_max, grown - engine.kv.committed_bytes)
    counted = fixed + engine.kv.committed_bytes
    engine.close()
    return {"runtime_bytes": max(0, beside_kv - fixed), "runtime_baseline_bytes": baseline, "kv_max_bytes": kv_max,
            "measured_peak_bytes": peak, "measured_end_bytes": grown, "counted_bytes": counted, "device": device,
            "dtype": dtype, "cpu_linear": cpu_linear, "cpu_kernels": cpu_kernels, "batch": batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.llm.engine.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cpu-linear", default="blocked", help="blocked | memfit | onednn | none (plain F.linear)")
    ap.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded at once (and the engine's max_num_seqs)")
    ap.add_argument("--write-model", default=None, help=argparse.SUPPRESS)  # internal: the model, in its own process
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.environ[CALIBRATING_ENV] = "1"
    if a.write_model:
        _write_tiny_model(Path(a.write_model), a.dtype)
        return 0
    with tempfile.TemporaryDirectory(prefix="memfit-calibrate-") as tmp:
        # Written by another process: building it here would leave its imports and freed tensors in this one,
        # where the engine would reuse them unseen and the runtime's share would come out too small.
        subprocess.run([sys.executable, "-m", "memfit.llm.engine.calibrate", "--write-model", tmp, "--dtype", a.dtype],
                       check=True)
        r = measure(Path(tmp), a.device, a.dtype, a.cpu_linear, a.cpu_kernels, a.batch)
    print(json.dumps(r) if a.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
