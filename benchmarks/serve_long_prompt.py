"""Does one huge prompt hold up the server's other clients? `/health` latency while multi-megabyte prompts are read.

A `memfit serve` on the bundled model gets, `--reps` times, a /v1/completions request whose prompt is `--mb`
megabytes of text (far past the context, so it is tokenized, then refused with a 400: the cost is the reading),
while another thread asks for /health every 10 ms. Reported: each long request's time, and /health's latency
while it ran against /health's latency with nothing else running. Tokenized on the event loop, /health waits
for the whole tokenization; memfit tokenizes text over 16k characters on a worker thread (serving.OFF_LOOP_CHARS).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.serve_long_prompt --mb 4 --reps 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from benchmarks.common import emit, header
from benchmarks.serve_load import memfit_server


def poll_health(url: str, stop: threading.Event, out: list[float]) -> None:
    """/health's latency (s), every 10 ms until `stop`."""
    import httpx

    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            client.get(url + "/health")
            out.append(time.perf_counter() - t0)
            time.sleep(0.01)


def health_during(url: str, work) -> tuple[float, list[float]]:
    """Run `work()` while /health is polled: (work's seconds, /health latencies meanwhile)."""
    stop, lat = threading.Event(), []
    poller = threading.Thread(target=poll_health, args=(url, stop, lat))
    poller.start()
    time.sleep(0.1)  # the poller is running before the work starts
    t0 = time.perf_counter()
    work()
    took = time.perf_counter() - t0
    stop.set()
    poller.join()
    return took, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=4.0, help="prompt size in megabytes of text (default 4)")
    ap.add_argument("--reps", type=int, default=3, help="long requests, one after another (default 3)")
    ap.add_argument("--model", default="memfit-tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.mb <= 0 or args.reps < 1:
        print("--mb must be positive and --reps at least 1", file=sys.stderr)
        return 2
    import httpx

    body_mb = int(args.mb) + 2
    with memfit_server(args.model, args.threads, "--max-body-size", f"{body_mb}MiB") as url:
        prompt = "hello world " * int(args.mb * 1e6 / 12)
        _, idle = health_during(url, lambda: time.sleep(1.0))
        rounds = []
        for i in range(args.reps):
            status: list[int] = []

            def long_request() -> None:
                r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=300)
                status.append(r.status_code)

            took, lat = health_during(url, long_request)
            rounds.append({"request_s": took, "status": status[0], "health_max_s": max(lat),
                           "health_median_s": statistics.median(lat), "health_polls": len(lat)})
            print(f"[{i + 1}/{args.reps}] {args.mb} MB prompt: {took:.2f} s (HTTP {status[0]}), /health max "
                  f"{max(lat) * 1e3:.0f} ms", file=sys.stderr)
    result = {**header(args.threads), "benchmark": "serve_long_prompt", "model": args.model,
              "prompt_chars": len(prompt),
              "idle_health_max_s": max(idle), "idle_health_median_s": statistics.median(idle),
              "request_s_median": statistics.median(r["request_s"] for r in rounds),
              "health_max_s_median": statistics.median(r["health_max_s"] for r in rounds), "rounds": rounds}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
