"""Requests on a kept-alive connection against requests that each open their own: does reusing a connection cost?

A `memfit serve` on the bundled model answers the same request sent two ways, in turn round by round, three
back to back each: on one connection kept alive (as the OpenAI client, httpx and load balancers send them) and
on a new connection each time. Three requests: `/health`, a completion of one token, and a streamed completion's first token
(TTFT). Reported per request and way: the median and p90 latency (ms), and keep-alive over new-connection.

Before 2026-12-07 the listening socket did not say it was TCP, so asyncio left Nagle's algorithm on for every
connection; uvicorn writes a response's head and body apart, and each body after a connection's first waited
for the client's delayed ACK (~40 ms): kept-alive requests were slower than new connections.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.serve_keepalive --rounds 40 --out benchmarks/results/serve_keepalive.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.common import emit, header
from benchmarks.serve_load import memfit_server

REQUESTS = {
    "health": ("GET", "/health", None),
    "completion_1_token": ("POST", "/v1/completions", {"prompt": "hello world", "max_tokens": 1}),
    "stream_ttft": ("POST", "/v1/completions", {"prompt": "hello world", "max_tokens": 8, "stream": True}),
}
BURST = 3  # requests of one kind and way back to back in a round


def timed(client, method: str, url: str, body: dict | None) -> float:
    """Seconds to the response's end, or to the first streamed event for a streamed request."""
    t0 = time.perf_counter()
    with client.stream(method, url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{method} {url}: HTTP {r.status_code} {r.read()[:200]!r}")
        if body and body.get("stream"):
            took = None
            for line in r.iter_lines():  # to the end, so the connection can be reused
                if took is None and line.startswith("data:"):
                    took = time.perf_counter() - t0
            if took is None:
                raise RuntimeError(f"{url}: the stream ended without an event")
            return took
        r.read()
    return time.perf_counter() - t0


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "n": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="rounds; each times 3 requests of each kind and way (default 40)")
    ap.add_argument("--model", default="memfit-tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.rounds < 2:
        print("--rounds must be at least 2", file=sys.stderr)
        return 2
    import httpx

    times: dict[str, dict[str, list[float]]] = {k: {"kept_alive": [], "new_connection": []} for k in REQUESTS}
    with memfit_server(args.model, args.threads) as url:
        # A fresh client is made outside the timed call: a new connection's time is its TCP connect and the request.
        with httpx.Client(timeout=60) as kept:
            for name, (method, path, body) in REQUESTS.items():
                timed(kept, method, url + path, body)  # warm: the server's first of each, the connection made
            for i in range(args.rounds):
                # each way in turn, a burst of requests back to back (as a client with work queued sends them)
                for name, (method, path, body) in REQUESTS.items():
                    for _ in range(BURST):
                        times[name]["kept_alive"].append(timed(kept, method, url + path, body))
                    for _ in range(BURST):
                        with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
                            times[name]["new_connection"].append(timed(fresh, method, url + path, body))
                if (i + 1) % 10 == 0:
                    print(f"[{i + 1}/{args.rounds}]", file=sys.stderr)
    requests = {}
    for name, ways in times.items():
        kept, new = summary(ways["kept_alive"]), summary(ways["new_connection"])
        requests[name] = {"kept_alive": kept, "new_connection": new,
                          "kept_over_new_median": kept["median_ms"] / new["median_ms"]}
        print(f"{name}: kept alive {kept['median_ms']:.2f} ms, new connection {new['median_ms']:.2f} ms",
              file=sys.stderr)
    result = {**header(args.threads), "benchmark": "serve_keepalive", "model": args.model, "rounds": args.rounds,
              "requests": requests}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
