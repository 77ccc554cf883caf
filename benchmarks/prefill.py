"""Prefill at the compute limit: memfit against transformers, llama.cpp (where llama-cpp-python is importable) and
vLLM's CPU build (where its venv is given), each as a fraction of this core's measured multiply-add peak.

Workload (issue 14): the 0.1B random-initialised Llama in bf16, one thread, --prompts prompts of
--prompt-len random tokens, one output token each (the logits of the last token only). Per system:

- batch: all prompts submitted at once, time until every first token is out -> prefill tokens/s and the
  fraction of peak: the matmuls' multiply-adds (every layer's q/k/v/o/gate/up/down for every token, the
  head for one token per prompt; attention's ~1.5% and the embedding left out) / time / peak;
- TTFT: one prompt alone (time to its first token), and the mean over the batch's prompts of the time their
  first token came out.

Systems, timed interleaved round by round (medians of --reps):
- memfit: the offline `LLM` API at its defaults (blocked matmuls, memfit's CPU kernels, 2048-token steps on a
  CPU: engine/config.py's OFFLINE_CPU_STEP_TOKENS);
- memfit_previous: the same engine with every prefill matmul on the AVX-512 blocked kernel (memfit's default
  before the run-time choice of kernels/large_m.py; an AMX core then also runs the AMX kernel): before/after in
  one run;
- memfit_onednn: `--cpu-linear onednn` (oneDNN's matmul on its own packed layout, memfit's other kernels);
- memfit_mlp_whole: the default engine with the MLP run over the whole step instead of its row blocks (256 rows
  in bf16, 64 in float32) (what
  the blocks' memory bound costs in time);
- memfit_unfused: the default engine as its MLP ran before aab6db9 on a core without AMX: 64-row MLP blocks and
  SiLU x up a separate kernel after the gate/up matmul (the fused store, `BlockedLinear.silu_mul_rows`, turned
  off): before/after in one run;
- memfit_step512: the default engine with `max_num_batched_tokens=512`, the server's and the CLI's step (the
  offline default is 2048, vLLM's CPU build's 4096): 8 steps instead of 2. (4096 measured slower here, 2.3-2.4 s
  against 1.9-2.0: its
  activations, 32 MiB for gate/up, reach glibc's largest mmap threshold, so every step faults fresh pages in:
  130k minor faults per batch against 2-12k at 512-2048.)
- memfit_attention_avx512: the default engine with prefill attention pinned to its AVX-512 path
  (`kernels.prefill.force`; the default runs it on AMX tiles where the core has them): before/after in one run,
  with its own timed breakdown (`memfit_attention_avx512_breakdown`);
- transformers: LlamaForCausalLM (sdpa attention) on the same checkpoint, forward of `b` prompts at a time
  with logits for the last token only, for b = 4 (memfit's 512-token step) and b = all (one forward);
- llamacpp (optional: llama-cpp-python and gguf importable, else its row says why and the rest runs): llama.cpp
  through llama-cpp-python's low-level API on the same checkpoint written to GGUF in bf16 (benchmarks/
  decode_llamacpp.py's `write_gguf`; token ids fed directly, no tokenizer), one stream of KV a sequence
  (llama.cpp's default), every prompt in one `llama_decode` call (n_batch = all the batch's tokens, each prompt
  its own sequence id, logits for each prompt's last token only, greedy next token), `--threads` threads for
  both n_threads and n_threads_batch. It runs at each of its settings that matter here, each its own system in
  the rounds (`llamacpp_fa_<on|off>_ub<N>`: flash attention on (its CPU default) or off, `--llamacpp-ubatch`
  tokens computed at a time, 512 (its default), 2048 and 4096: the whole batch); the fastest batch is the
  `llamacpp` row, every
  setting's row under its `settings`, and `greedy_agree_with_memfit`: the prompts of the last round whose next
  token matched memfit's (where memfit ran). Install it outside the project's venv, e.g.
  `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-deps --target DIR llama-cpp-python gguf` (a source build,
  about 15 minutes on 2 cores), then run with `PYTHONPATH=DIR`;
- vllm (optional, `--vllm-python PATH`): vLLM's CPU build run in its own venv (it can't share this one), in
  its own process after the others, with its own warm-up (so not interleaved).

`--systems a,b,...` runs a subset (memfit and at least one peer). Decode must not regress: decode step time at batch 1 and 8 for memfit and memfit_previous, interleaved.

Times are process CPU time (the machine is shared by several jobs: at a load average of 5 on 2 cores wall
time doubles, CPU time does not); wall time is reported beside it, with the load average before and after.
The peak is measured the same way (memfit.llm.kernels.peak with time.process_time, the best of the runs before
and after the systems): the larger of the AVX-512 loop's (vdpbf16ps) and, on a core with AMX, the tile unit's
(TDPBF16PS), both in the JSON.

    OMP_NUM_THREADS=1 python -m benchmarks.prefill --threads 1 --out benchmarks/results/prefill.json
    OMP_NUM_THREADS=1 PYTHONPATH=DIR python -m benchmarks.prefill --threads 1 --systems memfit,llamacpp,transformers_b4

Prints one JSON object; --out also writes it and a PNG beside it.
"""
from __future__ import annotations

from benchmarks.common import preset_threads

if __name__ == "__main__":
    preset_threads()  # --threads, read before torch and oneDNN start their thread pools

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, header, pin_threads
from benchmarks.decode_setup import SHAPES, make_model_dir

VLLM_SCRIPT = Path(__file__).with_name("prefill_vllm.py")


def matmul_macs(shape: dict, prompts: int, prompt_len: int) -> int:
    """Multiply-adds of the prefill's matmuls: every layer's projections for every token, the head per prompt."""
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    per_token = h * (q + 2 * kv) + q * h + 2 * h * i + i * h
    return per_token * layers * prompts * prompt_len + h * v * prompts


def measure_peak(reps: int = 5) -> dict[str, float]:
    """The core's bf16 multiply-add peaks in CPU time: the AVX-512 loop's and the AMX tile unit's (nan without)."""
    from memfit.llm.kernels.peak import amx_peak_macs_per_s, peak_macs_per_s

    avx = peak_macs_per_s(torch.bfloat16, 1, seconds=0.2, reps=reps, clock=time.process_time)
    amx = amx_peak_macs_per_s(seconds=0.2, reps=reps, clock=time.process_time)
    return {"avx512": avx or float("nan"), "amx": amx or float("nan")}


@contextlib.contextmanager
def on_avx512(module):
    """A kernel module's (kernels/large_m.py: the prefill matmuls; kernels/prefill.py: prefill attention) run-time
    choice pinned to its AVX-512 path, as memfit ran before that choice existed."""
    old = module.force("avx512")
    try:
        yield
    finally:
        module.force(old)


def previous_kernels():
    """memfit as it was before the run-time kernel choice: every prefill matmul on the AVX-512 blocked kernel."""
    from memfit.llm.kernels import large_m

    return on_avx512(large_m)


class Clock:
    """CPU and wall seconds since start."""

    def __init__(self) -> None:
        self.c, self.w = time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        return time.process_time() - self.c, time.perf_counter() - self.w


def attention_avx512():
    """memfit's prefill attention on its AVX-512 path, as before the AMX path (kernels/prefill.py)."""
    from memfit.llm.kernels import prefill

    return on_avx512(prefill)


def memfit_system(path: Path, cpu_linear: str, previous: bool, step_tokens: int | None = None, mlp_whole: bool = False,
                  attention_before: bool = False, unfused: bool = False):
    from memfit.llm.engine.api import LLM
    from memfit.llm.engine.params import SamplingParams

    # the offline API, as a user of this workload builds it; its default step on a CPU is 2048 tokens (the
    # server's is 512: engine/config.py's OFFLINE_CPU_STEP_TOKENS)
    step = {} if step_tokens is None else {"max_num_batched_tokens": step_tokens}
    eng = LLM(model=str(path), dtype="bfloat16", kv_budget="2GiB", max_num_seqs=64, max_model_len=1024,
              cpu_linear=cpu_linear, **step).engine
    if mlp_whole:  # the MLP over the whole step, not in its row blocks (more memory: see models/llama.py MLP)
        for m in eng.runner.model.modules():
            if hasattr(m, "row_block"):
                m.row_block = 0
    if unfused:  # the MLP before aab6db9: 64-row blocks, the gate/up matmul then silu_mul (see the module doc)
        for m in eng.runner.model.modules():
            if hasattr(m, "row_block"):
                m.row_block = 64
            if getattr(m, "gate_up_proj", None) is not None and hasattr(m.gate_up_proj, "silu_mul_rows"):
                m.gate_up_proj.silu_mul_rows = lambda x, out=None: None  # MLP._rows then runs forward + silu_mul
    params = SamplingParams(max_tokens=1, temperature=0)

    def run(prompts: list[list[int]]) -> dict:
        ctx = previous_kernels() if previous else contextlib.nullcontext()
        with ctx, (attention_avx512() if attention_before else contextlib.nullcontext()):
            rids = [eng.add_request(prompt_token_ids=ids, params=params) for ids in prompts]
            clock, firsts, tokens = Clock(), [], {}
            while eng.has_unfinished_requests():
                outs = eng.step()
                firsts += [clock.read()] * len(outs)  # max_tokens=1: a request's output is its first token
                tokens.update((o.request_id, o.token_ids[0]) for o in outs)
            cpu, wall = clock.read()
        assert len(firsts) == len(prompts)
        return {"cpu": cpu, "wall": wall, "ttft_cpu": statistics.mean(f[0] for f in firsts),
                "ttft_wall": statistics.mean(f[1] for f in firsts), "next_tokens": [tokens[r] for r in rids]}

    return run, eng.close


def transformers_system(path: Path, per_forward: int | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()

    def run(prompts: list[list[int]]) -> dict:
        b = per_forward or len(prompts)
        clock, firsts = Clock(), []
        with torch.inference_mode():
            for s in range(0, len(prompts), b):
                ids = torch.tensor(prompts[s : s + b])
                logits = model(input_ids=ids, logits_to_keep=1).logits  # (b, 1, V), KV cache built as in generate
                logits[:, -1].argmax(-1)
                firsts += [clock.read()] * ids.shape[0]
        cpu, wall = clock.read()
        return {"cpu": cpu, "wall": wall, "ttft_cpu": statistics.mean(f[0] for f in firsts),
                "ttft_wall": statistics.mean(f[1] for f in firsts)}

    return run, lambda: None


def llamacpp_system(path: Path, gguf: Path, prompts: int, prompt_len: int, threads: int, n_ubatch: int, flash: bool):
    """llama.cpp on the GGUF of the checkpoint at `path`: a context for `prompts` sequences of up to `prompt_len`
    tokens, one KV stream each, every prompt of a batch in one llama_decode call computed `n_ubatch` tokens at a
    time, flash attention on or off. The context is built once; each run clears its KV first (untimed)."""
    import llama_cpp as L

    from benchmarks.decode_llamacpp import close_llamacpp, greedy, open_llamacpp, quiet_llamacpp, submit

    quiet_llamacpp()
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    per_seq = -(-(prompt_len + 8) // 256) * 256  # a stream's cells
    n_batch = max(prompts * prompt_len, n_ubatch)
    model, ctx, lb = open_llamacpp(gguf, prompts * per_seq, threads, n_batch=n_batch, n_ubatch=n_ubatch,
                                   n_seq_max=prompts, unified=False, flash=flash)
    memory = L.llama_get_memory(ctx)

    def run(batch: list[list[int]]) -> dict:
        assert len(batch) <= prompts and sum(map(len, batch)) <= n_batch and max(map(len, batch)) <= per_seq
        L.llama_memory_clear(memory, True)
        entries = [(tok, p, s, p == len(ids) - 1) for s, ids in enumerate(batch) for p, tok in enumerate(ids)]
        last = [i for i, e in enumerate(entries) if e[3]]  # each prompt's last token's row in the llama_batch
        clock = Clock()
        submit(ctx, lb, entries)
        nxt = greedy(ctx, last, vocab)
        cpu, wall = clock.read()  # every prompt's first token comes out of the one call
        return {"cpu": cpu, "wall": wall, "ttft_cpu": cpu, "ttft_wall": wall, "next_tokens": nxt}

    return run, lambda: close_llamacpp(model, ctx, lb)


def llamacpp_settings(ubatches: list[int]) -> dict[str, dict]:
    """The llama.cpp settings the `llamacpp` row runs, by system name: flash attention on/off x n_ubatch."""
    return {f"llamacpp_fa_{'on' if fa else 'off'}_ub{ub}": {"flash": fa, "n_ubatch": ub}
            for ub in ubatches for fa in (True, False)}


MATMUL_PARTS = ("matmul_s", "matmul_silu_s", "matmul_rope_s")  # timed_parts' keys for memfit's matmul calls


def other_seconds(parts: dict) -> float:
    """What none of timed_parts' matmul and attention timers covers of the batch's total."""
    return parts["total_s"] - sum(parts.get(k, 0.0) for k in (*MATMUL_PARTS, "attention_s"))


@contextlib.contextmanager
def timed_parts(acc: dict):
    """CPU seconds spent in memfit's matmuls (BlockedLinear; matmul_silu_s: the gate/up matmul with SiLU x up in its
    store; matmul_rope_s: the q/k/v matmul with RoPE in its store) and attention (CachedAttention) while active, and of
    the rest, in memfit's element-wise kernels (CpuDecodeOps: the norms with their residual adds, RoPE, SiLU x up)
    and the LM head's sampler (`*_s` keys beside matmul_s and attention_s; other_s is what none of them covers)."""
    from memfit.llm.kernels.attention import CachedAttention
    from memfit.llm.kernels.blocked import BlockedLinear
    from memfit.llm.kernels.decode import CpuDecodeOps

    # silu_mul_rows: the MLP's gate/up matmul with SiLU x up fused into its store (where it runs, silu_mul does not)
    # rope_rows: the attention's q/k/v matmul with RoPE in its store (where it runs, CpuDecodeOps.rope does not)
    saved = {(BlockedLinear, "forward"): "matmul_s", (BlockedLinear, "silu_mul_rows"): "matmul_silu_s",
             (BlockedLinear, "rope_rows"): "matmul_rope_s",
             (CachedAttention, "__call__"): "attention_s",
             (CpuDecodeOps, "add_rms_norm"): "rest_norm_s", (CpuDecodeOps, "rope"): "rest_rope_s",
             (CpuDecodeOps, "silu_mul"): "rest_silu_mul_s"}
    originals = {k: getattr(*k) for k in saved}

    def wrap(fn, key):
        def timed(*a, **kw):
            t = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                acc[key] = acc.get(key, 0.0) + time.process_time() - t
        return timed

    for (cls, name), key in saved.items():
        setattr(cls, name, wrap(originals[(cls, name)], key))
    try:
        yield
    finally:
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)


def decode_steps(path: Path, batch: int, previous: bool, steps: int = 24, prepack: bool = True) -> float:
    """Median CPU ms of memfit's decode steps at `batch` (prompts of 32 tokens); `prepack=False`: plain F.linear."""
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", kv_budget="2GiB", max_num_seqs=batch,
                                 max_model_len=512, prepack=prepack))
    g = torch.Generator().manual_seed(batch)
    ctx = previous_kernels() if previous else contextlib.nullcontext()
    times = []
    with ctx:
        for _ in range(batch):
            eng.add_request(prompt_token_ids=torch.randint(0, 32000, (32,), generator=g).tolist(),
                            params=SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
        for _ in range(4):  # prefill and warm-up
            eng.step()
        while eng.has_unfinished_requests():
            t = time.process_time()
            eng.step()
            times.append((time.process_time() - t) * 1e3)
    eng.close()
    return statistics.median(times)


def run_vllm(python: str, path: Path, prompts: int, prompt_len: int, reps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = subprocess.run([python, str(VLLM_SCRIPT), str(path), str(prompts), str(prompt_len), str(reps)],
                         capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": f"vLLM run failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}"}
    raw = json.loads(line[7:])
    return {"batch": {"cpu": statistics.median(raw["batch_cpu"]), "wall": statistics.median(raw["batch_wall"]),
                      "ttft_cpu": None, "ttft_wall": None},
            "one": {"cpu": statistics.median(raw["one_cpu"]), "wall": statistics.median(raw["one_wall"])},
            "version": raw.get("version")}


def summarise(batch: list[dict], one: list[dict], macs: int, tokens: int, peak: float) -> dict:
    med = {k: statistics.median(r[k] for r in batch) for k in ("cpu", "wall", "ttft_cpu", "ttft_wall")}
    return {"batch_s": round(med["cpu"], 4), "batch_wall_s": round(med["wall"], 4),
            "tok_per_s": round(tokens / med["cpu"], 1), "gmac_per_s": round(macs / med["cpu"] / 1e9, 1),
            "fraction_of_peak": round(macs / med["cpu"] / peak, 3),
            "ttft_mean_ms": round(med["ttft_cpu"] * 1e3, 1), "ttft_single_ms": round(statistics.median(r["cpu"] for r in one) * 1e3, 1),
            "ttft_single_wall_ms": round(statistics.median(r["wall"] for r in one) * 1e3, 1)}


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["systems"]
    names = [n for n in rows if "fraction_of_peak" in rows[n]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].barh(names, [rows[n]["fraction_of_peak"] for n in names], color="tab:blue")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("fraction of the measured bf16 MAC peak (matmul MACs / CPU time)")
    axes[0].set_title(f"prefill: {result['prompts']} x {result['prompt_len']} tokens, 0.1b bf16, 1 thread")
    axes[1].barh(names, [rows[n]["ttft_single_ms"] for n in names], color="tab:orange")
    axes[1].set_xlabel("TTFT of one prompt alone, ms CPU")
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vLLM's CPU build (optional peer)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode regression check")
    ap.add_argument("--out", default=None)
    ap.add_argument("--systems", default=None, help="comma-separated subset of the systems (default: all); "
                    "llamacpp runs each of its settings (--llamacpp-ubatch x flash attention on/off)")
    ap.add_argument("--llamacpp-ubatch", type=int, nargs="+", default=[512, 2048, 4096],
                    help="llama.cpp's n_ubatch values to try (tokens computed at a time; its default is 512)")
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm.kernels.prefill import available

    if not available(torch.bfloat16):
        print(json.dumps({"error": "memfit's bf16 CPU kernels are unavailable here (see the log)"}))
        return 1
    load_before = os.getloadavg()
    peaks = [measure_peak()]
    print(f"peaks {peaks[0]['avx512'] / 1e9:.1f} (AVX-512), {peaks[0]['amx'] / 1e9:.1f} (AMX) GMAC/s (CPU time)",
          file=sys.stderr)
    g = torch.Generator().manual_seed(0)

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(0, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir("0.1b", "bfloat16", Path(tmp))
        makers = {"memfit": lambda: memfit_system(path, "auto", False),
                  "memfit_previous": lambda: memfit_system(path, "auto", True),
                  "memfit_onednn": lambda: memfit_system(path, "onednn", False),
                  "memfit_step512": lambda: memfit_system(path, "auto", False, 512),
                  "memfit_mlp_whole": lambda: memfit_system(path, "auto", False, mlp_whole=True),
                  "memfit_attention_avx512": lambda: memfit_system(path, "auto", False, attention_before=True),
                  "memfit_unfused": lambda: memfit_system(path, "auto", False, unfused=True),
                  "transformers_b4": lambda: transformers_system(path, 4),
                  f"transformers_b{args.prompts}": lambda: transformers_system(path, None)}
        wanted = set(args.systems.split(",")) if args.systems else {*makers, "llamacpp"}
        unknown = wanted - set(makers) - {"llamacpp"}
        if unknown:
            ap.error(f"unknown systems {sorted(unknown)}; choose from {sorted(makers) + ['llamacpp']}")
        llamacpp_note = None
        if "llamacpp" in wanted:
            from benchmarks.decode_llamacpp import llamacpp_missing, write_gguf

            llamacpp_note = llamacpp_missing()
            if llamacpp_note:
                print(f"llamacpp skipped: {llamacpp_note}", file=sys.stderr)
            else:
                gguf_path = Path(tmp) / "llama-0.1b-bfloat16.gguf"
                write_gguf(path, gguf_path)
                for name, kw in llamacpp_settings(args.llamacpp_ubatch).items():
                    makers[name] = (lambda kw=kw: llamacpp_system(path, gguf_path, args.prompts, args.prompt_len,
                                                                   args.threads, **kw))
                    wanted.add(name)
        systems = {name: make() for name, make in makers.items() if name in wanted}
        last_tokens: dict[str, list[int]] = {}
        batch: dict[str, list[dict]] = {n: [] for n in systems}
        one: dict[str, list[dict]] = {n: [] for n in systems}
        for rnd in range(args.reps + 1):  # round 0 warms every system up
            work, single = prompts(args.prompts), prompts(1)
            for name, (run, _) in systems.items():
                b, o = run(work), run(single)
                if rnd:
                    batch[name].append(b)
                    one[name].append(o)
                    last_tokens[name] = b.get("next_tokens")
            print(f"round {rnd}/{args.reps}: " + ", ".join(f"{n} {batch[n][-1]['cpu']:.2f}s" for n in systems if batch[n]),
                  file=sys.stderr)
        parts: dict[str, float] = {}
        if "memfit" in systems:
            with timed_parts(parts):  # where memfit's batch time goes (one more run, timers on)
                parts["total_s"] = systems["memfit"][0](prompts(args.prompts))["cpu"]
            parts["other_s"] = other_seconds(parts)
            parts["other_not_element_wise_s"] = parts["other_s"] - sum(v for k, v in parts.items()
                                                                       if k.startswith("rest_"))
        parts_before: dict[str, float] = {}
        if "memfit_attention_avx512" in systems:  # the same, attention on the AVX-512 path
            before: dict[str, float] = {}
            with timed_parts(before):
                before["total_s"] = systems["memfit_attention_avx512"][0](prompts(args.prompts))["cpu"]
            before["other_s"] = other_seconds(before)
            parts_before = before
        from memfit.llm.kernels import large_m

        kernel_choices = {f"{n}x{k} nb{nb}": {"kernel": c.kernel, "rows": c.rows,
                                              **{f"{name}_ms": round(t * 1e3, 3) for name, t in c.seconds.items()}}
                          for (n, k, nb), c in large_m.choices().items()}
        for _, close in systems.values():
            close()
        decode = []
        if not args.no_decode:
            for b in (1, 8):
                t: dict[str, list[float]] = {"memfit_ms": [], "memfit_previous_ms": []}
                for _ in range(3):
                    t["memfit_ms"].append(decode_steps(path, b, False))
                    t["memfit_previous_ms"].append(decode_steps(path, b, True))
                row = {"batch": b, **{k: round(statistics.median(v), 2) for k, v in t.items()}}
                row["previous_over_now"] = round(row["memfit_previous_ms"] / row["memfit_ms"], 3)
                decode.append(row)
        vllm = run_vllm(args.vllm_python, path, args.prompts, args.prompt_len, args.reps) if args.vllm_python else None
    peaks.append(measure_peak())
    by_unit = {unit: max(p[unit] for p in peaks) for unit in ("avx512", "amx")}
    peak = max(v for v in by_unit.values() if v == v)  # nan (no AMX) left out
    macs, tokens = matmul_macs(SHAPES["0.1b"], args.prompts, args.prompt_len), args.prompts * args.prompt_len
    rows = {n: summarise(batch[n], one[n], macs, tokens, peak) for n in systems if not n.startswith("llamacpp_")}
    lc = {n: summarise(batch[n], one[n], macs, tokens, peak) for n in systems if n.startswith("llamacpp_")}
    if lc:
        import llama_cpp

        fastest = min(lc, key=lambda n: lc[n]["batch_s"])
        ours = last_tokens.get("memfit")
        agree = (None if ours is None else
                 {n: sum(a == b for a, b in zip(ours, last_tokens[n])) / len(ours) for n in lc})
        rows["llamacpp"] = {**lc[fastest], "setting": fastest[len("llamacpp_"):],
                            "version": f"llama-cpp-python {llama_cpp.__version__}", "kv": "a stream a sequence",
                            "n_batch": max(tokens, *args.llamacpp_ubatch),
                            "greedy_agree_with_memfit": agree and agree[fastest],
                            "settings": {n[len("llamacpp_"):]: {**r, "greedy_agree_with_memfit": agree and agree[n]}
                                         for n, r in lc.items()}}
    elif llamacpp_note:
        rows["llamacpp"] = {"error": llamacpp_note}
    if vllm is not None:
        if "error" in vllm:
            rows["vllm"] = vllm
        else:
            cpu = vllm["batch"]["cpu"]
            rows["vllm"] = {"batch_s": round(cpu, 4), "batch_wall_s": round(vllm["batch"]["wall"], 4),
                            "tok_per_s": round(tokens / cpu, 1), "gmac_per_s": round(macs / cpu / 1e9, 1),
                            "fraction_of_peak": round(macs / cpu / peak, 3), "ttft_mean_ms": None,
                            "ttft_single_ms": round(vllm["one"]["cpu"] * 1e3, 1),
                            "ttft_single_wall_ms": round(vllm["one"]["wall"] * 1e3, 1), "version": vllm.get("version")}
    peers = {n: r for n, r in rows.items() if not n.startswith("memfit") and "batch_s" in r}
    best = min(peers, key=lambda n: peers[n]["batch_s"]) if peers else None
    vs_best = (round(peers[best]["batch_s"] / rows["memfit"]["batch_s"], 3)
               if best and "memfit" in rows else None)
    result = {"benchmark": "prefill", **header(args.threads), "timer": "process CPU time, median (wall beside it)",
              "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "prompts": args.prompts, "prompt_len": args.prompt_len, "reps": args.reps,
              "matmul_macs": macs, "peak_gmac_per_s": round(peak / 1e9, 1),
              "peak_by_unit_gmac_per_s": {u: round(v / 1e9, 1) for u, v in by_unit.items()},
              "peak_runs_gmac_per_s": [{u: round(v / 1e9, 1) for u, v in p.items()} for p in peaks],
              "kernel_choices": kernel_choices,
              "systems": rows, "best_peer": best,
              "memfit_vs_best_peer": vs_best,
              "memfit_vs_llamacpp": (round(rows["llamacpp"]["batch_s"] / rows["memfit"]["batch_s"], 3)
                                     if "batch_s" in rows.get("llamacpp", {}) and "memfit" in rows else None),
              "memfit_vs_previous": (round(rows["memfit_previous"]["batch_s"] / rows["memfit"]["batch_s"], 3)
                                     if "memfit_previous" in rows else None),
              "memfit_vs_attention_avx512": (round(rows["memfit_attention_avx512"]["batch_s"] / rows["memfit"]["batch_s"], 3)
                                             if "memfit_attention_avx512" in rows else None),
              "memfit_vs_unfused": (round(rows["memfit_unfused"]["batch_s"] / rows["memfit"]["batch_s"], 3)
                                    if "memfit_unfused" in rows else None),
              "target": "memfit >= 1.2x the best peer (~85% of the peak)", "decode": decode,
              "memfit_breakdown": {k: round(v, 3) for k, v in parts.items()},
              "memfit_attention_avx512_breakdown": {k: round(v, 3) for k, v in parts_before.items()},
              "memfit_matmul_fraction_of_peak": (round(macs / sum(parts.get(k, 0.0) for k in MATMUL_PARTS) / peak, 3)
                                                 if parts.get("matmul_s") else None)}
    emit(result, args.out, draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
