"""Serving under load: MT-Bench conversations with Poisson arrivals against `memfit serve`, and the same
workload against `transformers serve` where it runs here.

Each conversation is one MT-Bench question (memfit/data/mt_bench/question.jsonl, Apache-2.0, from
lm-sys/FastChat): turn 1 is sent at its Poisson arrival time; turn 2 is sent once turn 1's answer has
streamed back, with that answer in the history (and an `X-Session-Id`, so memfit can reuse the KV of
turn 1). Every request streams (`stream_options.include_usage`), so the client sees each token arrive.

Per arrival rate (conversations/s) it reports, at p50/p95/p99:
  TTFT  time from sending a request to its first content token,
  TPOT  time per output token after the first: (latency - TTFT) / (tokens - 1), one value per request,
  ITL   inter-token latency: every gap between consecutive content chunks,
plus output-token throughput over the rate's wall time, and the server process's peak RSS (sampled during
the rate, and the kernel's high-water mark VmHWM for the whole run).

    python -m benchmarks.serve_load --rates 0.25 0.5 1 --conversations 12 --max-tokens 64 --threads 1 \
        --out benchmarks/results/serve_load.json

Prints one JSON object; --out also writes it and a PNG beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import emit, header

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "memfit" / "data" / "mt_bench" / "question.jsonl"

# Random-initialised Llama shapes with the bundled memfit-tiny tokenizer (4096 tokens, ChatML), for when
# the bundled weights are not there or a bigger model is wanted. Latency depends on the shape, not on
# what the weights learned; random weights rarely emit EOS, so answers run to --max-tokens.
RANDOM_SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
}


def make_random_model(shape: str, root: Path) -> Path:
    import torch
    import transformers

    tok_dir = ROOT / "memfit" / "assets" / "models" / "memfit-tiny"
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, rope_theta=10000.0,
                                   bos_token_id=None, eos_token_id=0, pad_token_id=0, **RANDOM_SHAPES[shape])
    torch.manual_seed(0)
    path = root / f"random-{shape}"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tok_dir / name, path / name)
    return path


# ---- servers ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, model: str, port: int, args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    if kind == "memfit":
        cmd = [sys.executable, "-m", "memfit.llm.server", "--model", model, "--port", str(port), "--threads",
               str(args.threads), "--kv-cache", args.kv_cache, "--log-level", "warning",
               "--max-waiting", "100000", "--max-num-seqs", str(args.max_num_seqs)]
        if args.kv_budget:
            cmd += ["--kv-budget", args.kv_budget]
    elif kind == "transformers":
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        cmd = [exe, "serve", model, "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--dtype",
               "auto", "--log-level", "warning"]
        if args.transformers_cb:
            cmd.append("--continuous-batching")
    else:
        raise ValueError(kind)
    log = open(Path(tempfile.gettempdir()) / f"serve_load_{kind}_{port}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


@contextmanager
def memfit_server(model: str, threads: int, *extra: str) -> Iterator[str]:
    """A `memfit serve` of `model` on a free port, ready (its log in the temp folder); yields its URL, stops it after."""
    port = free_port()
    cmd = [sys.executable, "-m", "memfit.llm.server", "--model", model, "--port", str(port), "--threads",
           str(threads), "--log-level", "warning", *extra]
    with open(Path(tempfile.gettempdir()) / f"memfit_server_{port}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(proc, url, 300)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} (see {proc.args})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


class RSSSampler:
    """Samples the resident set of a process tree every `period` seconds; `peak` is the largest seen."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.period, self.peak = period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def vm_hwm(pid: int) -> int | None:
    """The kernel's peak-RSS high-water mark of a process (Linux), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---- the workload ------------------------------------------------------------------------------------------
async def stream_turn(client, url: str, model: str, messages: list[dict], args, session: str) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    text, usage, status, error = [], None, None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"X-Session-Id": session}) as r:
            status = r.status_code
            if status != 200:
                error = (await r.aread()).decode()[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("usage"):
                        usage = ev["usage"]
                    for ch in ev.get("choices", []):
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            times.append(time.perf_counter())
                            text.append(piece)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(times)
    res = {"ok": status == 200 and error is None and bool(times), "status": status, "error": error,
           "latency": end - t0, "tokens": tokens, "text": "".join(text),
           "cached": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0}
    if times:
        res["ttft"] = times[0] - t0
        res["itl"] = [b - a for a, b in zip(times, times[1:])]
        res["tpot"] = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
    return res


async def conversation(client, url: str, model: str, q: dict, delay: float, args, cid: str, bar) -> list[dict]:
    await asyncio.sleep(delay)
    messages: list[dict] = []
    out = []
    for turn, content in enumerate(q["turns"][:2]):
        messages.append({"role": "user", "content": content})
        res = await stream_turn(client, url, model, messages, args, cid)
        res["turn"] = turn + 1
        out.append(res)
        bar.update(1)
        if not res["ok"]:
            break
        messages.append({"role": "assistant", "content": res.pop("text")})
    for r in out:
        r.pop("text", None)
    return out


def pct(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        i = (len(s) - 1) * p
        lo, hi = int(i), min(int(i) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "mean": statistics.fmean(s), "n": len(s)}


def run_rate(url: str, model: str, rate: float, questions: list[dict], args, pid: int) -> dict:
    import httpx
    from tqdm import tqdm

    rng = random.Random(args.seed)
    t, delays = 0.0, []
    for _ in questions:
        t += rng.expovariate(rate)
        delays.append(t)

    async def go() -> list[list[dict]]:
        limits = httpx.Limits(max_connections=len(questions) + 8, max_keepalive_connections=len(questions) + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
            with tqdm(total=2 * len(questions), desc=f"rate {rate}/s", unit="req", file=sys.stderr) as bar:
                return await asyncio.gather(*(conversation(client, url, model, q, d, args, f"c{rate}-{i}", bar)
                                              for i, (q, d) in enumerate(zip(questions, delays))))

    with RSSSampler(pid) as rss:
        t0 = time.perf_counter()
        convs = asyncio.run(go())
        wall = time.perf_counter() - t0
    reqs = [r for c in convs for r in c]
    ok = [r for r in reqs if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    errors: dict[str, int] = {}
    for r in reqs:
        if not r["ok"]:
            key = f"{r['status']}: {(r['error'] or '')[:120]}"
            errors[key] = errors.get(key, 0) + 1
    return {
        "rate_conv_per_s": rate, "conversations": len(questions), "requests": len(reqs), "ok": len(ok),
        "failed": len(reqs) - len(ok), "errors": errors, "wall_s": wall,
        "output_tokens": tokens, "throughput_tok_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "ttft_s": pct([r["ttft"] for r in ok]),
        "tpot_s": pct([r["tpot"] for r in ok if r.get("tpot") is not None]),
        "itl_s": pct([g for r in ok for g in r["itl"]]),
        "latency_s": pct([r["latency"] for r in ok]),
        "turn2_cached_prompt_tokens": sum(r["cached"] for r in ok if r["turn"] == 2),
        "peak_rss_bytes": rss.peak,
    }


def bench_server(kind: str, model: str, served_model: str, questions: list[dict], args) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(kind, model, port, args)
    try:
        t0 = time.perf_counter()
        wait_ready(proc, url, args.start_timeout)
        startup = time.perf_counter() - t0
        # One short warm-up request so the first rate does not pay for lazy initialisation.
        httpx.post(url + "/v1/chat/completions", timeout=args.request_timeout,
                   json={"model": served_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        rates = [run_rate(url, served_model, r, questions, args, proc.pid) for r in args.rates]
        out = {"server": kind, "startup_s": startup, "rates": rates, "peak_rss_bytes_vmhwm": vm_hwm(proc.pid)}
        if kind == "memfit":
            from memfit.llm.server.metrics import parse_metrics

            m = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
            out["server_metrics"] = {k: v for k, v in m.items() if "_bucket" not in k}
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for color, (name, res) in zip(("tab:blue", "tab:orange", "tab:green"), result["servers"].items()):
        if "rates" not in res:
            continue
        rates = [r["rate_conv_per_s"] for r in res["rates"]]
        for ax, key, label in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "itl_s", "inter-token latency (s)")):
            for p, style in (("p50", "-o"), ("p99", "--x")):
                ax.plot(rates, [r[key].get(p, float("nan")) for r in res["rates"]], style, color=color,
                        label=f"{name} {p}")
            ax.set_xlabel("arrival rate (conversations/s)")
            ax.set_ylabel(label)
        axes[2].plot(rates, [r["throughput_tok_s"] for r in res["rates"]], "-o", color=color, label=name)
        axes[2].set_xlabel("arrival rate (conversations/s)")
        axes[2].set_ylabel("output tokens/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"serve_load: MT-Bench, {result['config']['conversations']} conversations/rate, "
                 f"max_tokens {result['config']['max_tokens']}, {result['config']['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="memfit-tiny", help="model dir or bundled name (default: memfit-tiny)")
    ap.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                    help="serve a random-initialised Llama of this shape instead of --model")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="conversations per second")
    ap.add_argument("--conversations", type=int, default=12, help="conversations per rate")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache", default="virtual", choices=["virtual", "paged"])
    ap.add_argument("--kv-budget", default="256MiB")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--peers", nargs="*", default=[], choices=["transformers"], help="also run these servers")
    ap.add_argument("--transformers-cb", action="store_true", help="transformers serve --continuous-batching")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    import memfit

    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    random.Random(args.seed).shuffle(questions)
    questions = questions[: args.conversations]
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        model = str(make_random_model(args.random_shape, tmp)) if args.random_shape else args.model
        # memfit accepts the --model value itself as the model id; transformers serve wants the path.
        servers = {"memfit": bench_server("memfit", model, model, questions, args)}
        for peer in args.peers:
            try:
                path = model
                if "/" not in model:
                    from memfit.llm.models.loader import resolve_model_path

                    path = str(resolve_model_path(model))
                servers[peer] = bench_server(peer, path, path, questions, args)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                servers[peer] = {"skipped": f"{type(exc).__name__}: {exc}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "serve_load",
        "machine": {**header(args.threads, args.seed), "platform": platform.platform(),
                    "processor": platform.processor(), "cpus": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"memfit": getattr(memfit, "__version__", None), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "config": {"model": args.random_shape and f"random-{args.random_shape}" or args.model, "rates": args.rates,
                   "conversations": len(questions), "max_tokens": args.max_tokens, "threads": args.threads,
                   "kv_cache": args.kv_cache, "kv_budget": args.kv_budget, "seed": args.seed,
                   "workload": "MT-Bench (lm-sys/FastChat, Apache-2.0), 2 turns, Poisson arrivals, streaming, greedy"},
        "servers": servers,
    }
    emit(result, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
