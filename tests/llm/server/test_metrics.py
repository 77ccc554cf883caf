"""The Prometheus text format written by hand: buckets are cumulative `le` counts, names are stable."""
from __future__ import annotations

import math

from memfit.llm.server.metrics import Histogram, ServerMetrics, parse_metrics


def test_histogram_buckets_are_cumulative_and_le():
    h = Histogram("lat_seconds", "help", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, 3.0):
        h.observe(v)
    m = parse_metrics("\n".join(h.render()))
    assert m['lat_seconds_bucket{le="0.1"}'] == 2  # 0.1 itself falls in le="0.1"
    assert m['lat_seconds_bucket{le="1"}'] == 3
    assert m['lat_seconds_bucket{le="+Inf"}'] == 5 == m["lat_seconds_count"]
    assert math.isclose(m["lat_seconds_sum"], 5.65)


def test_server_metrics_names_and_types():
    sm = ServerMetrics()
    sm.ttft.observe(0.2)
    sm.requests.inc(finish_reason="stop")
    text = sm.render({"num_running": 3, "num_waiting": 1, "kv_committed_bytes": 4096, "kv_used_bytes": 1024,
                      "kv_budget_bytes": 1 << 20, "generated_tokens": 42, "prefix_cache_hit_tokens": 96,
                      "prefix_cached_bytes": 8192}, "ready")
    m = parse_metrics(text)
    assert m["memfit_requests_running"] == 3 and m["memfit_requests_waiting"] == 1
    assert m["memfit_kv_committed_bytes"] == 4096 and m["memfit_kv_used_bytes"] == 1024
    assert m["memfit_kv_budget_bytes"] == 1 << 20 and m["memfit_generated_tokens_total"] == 42
    assert m["memfit_prefix_cache_hit_tokens_total"] == 96 and m["memfit_prefix_cached_bytes"] == 8192
    assert m["memfit_time_to_first_token_seconds_count"] == 1
    assert m['memfit_requests_total{finish_reason="stop"}'] == 1
    assert "# TYPE memfit_generated_tokens_total counter" in text
    assert "# TYPE memfit_inter_token_latency_seconds histogram" in text
    # Every sample line is `name[{labels}] value`, every metric announced once.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))


def test_swap_series_carry_one_sample_per_tier_under_one_help_line():
    """With an SSD tier, each memfit_swap_* series has a host and an ssd sample, declared once (Prometheus text
    format allows one HELP/TYPE per metric)."""
    tier = {"out_bytes": 10, "in_bytes": 20, "out_ops": 1, "in_ops": 2, "resident_bytes": 5}
    swap = {**tier, "tier": "host", "seconds_buckets": (0.1,), "seconds_counts": [1, 0], "seconds_sum": 0.05,
            "tiers": [{**tier, "tier": "host"}, {**tier, "out_bytes": 7, "resident_bytes": 0, "tier": "ssd"}]}
    text = ServerMetrics().render({"swap": swap, "preemptions_by_mode": {"recompute": 0, "swap": 1}}, "ready")
    m = parse_metrics(text)
    assert m['memfit_swap_out_bytes_total{tier="host"}'] == 10 and m['memfit_swap_out_bytes_total{tier="ssd"}'] == 7
    assert m['memfit_tier_resident_bytes{tier="ssd"}'] == 0
    assert text.count("# HELP memfit_swap_out_bytes_total") == 1 and text.count("# TYPE memfit_tier_resident_bytes") == 1
