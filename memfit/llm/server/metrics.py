"""Server metrics in the Prometheus text exposition format (version 0.0.4).

The format is small enough to write by hand: `# HELP` / `# TYPE` lines, then `name{labels} value` samples;
a histogram is cumulative `_bucket{le="..."}` counters plus `_sum` and `_count`. Latencies are observed by
the engine thread (it sees every step), while `/metrics` is rendered on the event loop, so every mutable
series is guarded by a lock.

Gauges about the engine (`memfit_requests_running`, `memfit_kv_*`) come from the stats snapshot the engine
thread publishes after every step, never from the engine itself, which is not thread-safe.
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from typing import Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT spans queueing + prefill (ms to minutes on a CPU under load); inter-token latency is one
# decode step (sub-ms on a GPU to ~1 s on a loaded CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # first bound >= value: Prometheus buckets are `le`
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, c in zip(self.bounds + (math.inf,), counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {cumulative}"]
        return lines


class Counter:
    """A counter with optional labels: `inc(1, finish_reason="stop")`."""

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[tuple, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(dict(k))} {_fmt(v)}" for k, v in items] or [f"{self.name} 0"]
        return lines


# Engine stats key -> (metric name, type, help). Counters end in _total.
_ENGINE_SERIES = (
    ("num_running", "memfit_requests_running", "gauge", "Requests in the running batch."),
    ("num_waiting", "memfit_requests_waiting", "gauge", "Requests queued for admission (waiting for KV memory or a batch slot)."),
    ("kv_committed_bytes", "memfit_kv_committed_bytes", "gauge", "Physical KV-cache memory held (committed pages / allocated blocks)."),
    ("kv_used_bytes", "memfit_kv_used_bytes", "gauge", "KV-cache bytes holding written tokens."),
    ("kv_budget_bytes", "memfit_kv_budget_bytes", "gauge", "The KV cache's share of the memory budget."),
    ("memory_budget_bytes", "memfit_memory_budget_bytes", "gauge", "The whole engine's memory budget (the ledger's limit)."),
    ("memory_reserved_bytes", "memfit_memory_reserved_bytes", "gauge", "Bytes reserved in the ledger: weights, tokenizer, runtime, step and committed KV."),
    ("prefault_failures", "memfit_kv_prefault_failures_total", "counter", "Background KV commits that failed and were rolled back."),
    ("heap_trims", "memfit_heap_trims_total", "counter", "C-heap trims because the process neared its memory budget."),
    ("idle_heap_trims", "memfit_idle_heap_trims_total", "counter", "C-heap trims after the engine went idle."),
    ("kv_commit_failures", "memfit_kv_commit_failures_total", "counter", "KV commits the OS or driver refused (the request waited)."),
    ("tokens_held", "memfit_kv_tokens", "gauge", "Tokens whose K/V are in the cache."),
    ("prefix_cache_hit_tokens", "memfit_prefix_cache_hit_tokens_total", "counter",
     "Prompt tokens whose K/V came from the prefix cache (not prefilled)."),
    ("prefix_cache_query_tokens", "memfit_prefix_cache_query_tokens_total", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cached_bytes", "memfit_prefix_cached_bytes", "gauge",
     "KV memory held only by cached prefixes of finished requests (reusable, evicted under pressure)."),
    ("generated_tokens", "memfit_generated_tokens_total", "counter", "Tokens generated since the server started."),
    ("num_steps", "memfit_engine_steps_total", "counter", "Engine steps run since the server started."),
)


class ServerMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram("memfit_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("memfit_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.", ITL_BUCKETS)
        self.e2e = Histogram("memfit_request_latency_seconds", "Time from request arrival to its last token.", E2E_BUCKETS)
        self.requests = Counter("memfit_requests_total", "Finished engine requests by finish reason.")
        self.http_errors = Counter("memfit_request_errors_total", "Requests refused or failed, by HTTP status.")
        self.prompt_tokens = Counter("memfit_prompt_tokens_total", "Prompt tokens admitted.")

    def render(self, engine_stats: Mapping[str, float] | None, state: str) -> str:
        lines: list[str] = [
            "# HELP memfit_up 1 when the model is loaded and the server accepts requests.",
            "# TYPE memfit_up gauge",
            f"memfit_up {1 if state == 'ready' else 0}",
        ]
        stats = engine_stats or {}
        lines += _table_series(_ENGINE_SERIES, stats)
        lines += _preemption_series(stats)
        if stats.get("speculative"):  # only with a draft model
            lines += _table_series(_SPEC_SERIES, stats["speculative"])
        for series in (self.ttft, self.itl, self.e2e, self.requests, self.http_errors, self.prompt_tokens):
            lines += series.render()
        return "\n".join(lines) + "\n"


# Speculative decoding (engine stats()["speculative"], present only with a draft) -> (metric, type, help),
# named after vLLM's spec_decode series so dashboards carry over.
_SPEC_SERIES = (
    ("spec_steps", "memfit_spec_decode_verification_passes_total", "counter",
     "Target passes that verified drafted tokens."),
    ("spec_proposed", "memfit_spec_decode_num_draft_tokens_total", "counter", "Draft tokens verified by the target."),
    ("spec_accepted", "memfit_spec_decode_num_accepted_tokens_total", "counter", "Draft tokens the target accepted."),
    ("spec_emitted", "memfit_spec_decode_num_emitted_tokens_total", "counter",
     "Tokens emitted by verification passes (accepted drafts plus one from the target per sequence)."),
    ("spec_shrunk", "memfit_spec_decode_shrunk_total", "counter",
     "Sequence-steps that drafted fewer tokens than asked, for lack of memory or step budget."),
    ("draft_kv_committed_bytes", "memfit_spec_decode_draft_kv_committed_bytes", "gauge",
     "Physical KV memory the draft model holds."),
)


def _table_series(table: tuple, values: Mapping, labels: str = "") -> list[str]:
    """One sample per (stats key, metric name, type, help) row of `table`, read from `values` (0 if absent)."""
    lines: list[str] = []
    for key, name, kind, help in table:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{labels} {_fmt(values.get(key, 0))}"]
    return lines


# Swap tier stats key (engine stats()["swap"]) -> (metric name, type, help); labelled by tier.
_SWAP_SERIES = (
    ("out_bytes", "memfit_swap_out_bytes_total", "counter", "KV bytes swapped out to a tier."),
    ("in_bytes", "memfit_swap_in_bytes_total", "counter", "KV bytes swapped back in from a tier."),
    ("out_ops", "memfit_swap_out_ops_total", "counter",
     "KV runs moved swapping out to a tier (a copy or I/O each; a CPU virtual cache's chunk in one copy)."),
    ("in_ops", "memfit_swap_in_ops_total", "counter", "KV runs moved swapping back in from a tier (as out)."),
    ("resident_bytes", "memfit_tier_resident_bytes", "gauge", "Swapped KV bytes a tier holds now."),
)


def _preemption_series(stats: Mapping) -> list[str]:
    """Preemptions by mode, and the swap tiers' traffic (a histogram of seconds per swap, from the engine's counts)."""
    name = "memfit_preemptions_total"
    lines = [f"# HELP {name} Requests preempted, by what happened to their KV (recompute or swap).",
             f"# TYPE {name} counter"]
    by_mode = stats.get("preemptions_by_mode") or {"recompute": 0, "swap": 0}
    lines += [f"{name}{_labels({'mode': m})} {_fmt(v)}" for m, v in sorted(by_mode.items())]
    swap = stats.get("swap") or {}
    if not swap:
        return lines
    for key, name, kind, help in _SWAP_SERIES:  # one sample per tier (host, and ssd when there is one)
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{_labels({'tier': t['tier']})} {_fmt(t.get(key, 0))}" for t in swap.get("tiers", [swap])]
    metric = "memfit_swap_seconds"
    lines += [f"# HELP {metric} Seconds of one swap-out or swap-in (all its copies).", f"# TYPE {metric} histogram"]
    cumulative = 0
    for bound, c in zip(tuple(swap["seconds_buckets"]) + (math.inf,), swap["seconds_counts"]):
        cumulative += c
        lines.append(f'{metric}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
    lines += [f"{metric}_sum {_fmt(swap['seconds_sum'])}", f"{metric}_count {cumulative}"]
    return lines


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line (used by tests and the load benchmark)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
