"""/metrics with speculative decoding: the draft's counters appear, and agree with what the response says."""
from __future__ import annotations

import httpx

from memfit.llm.server.app import ServerSettings
from tests.llm.server.live import LiveServer


def test_speculative_counters_agree_with_the_tokens_served(model_dir, server):
    assert not any(k.startswith("memfit_spec_decode") for k in server.metrics())  # no draft, no series

    def load():
        import torch

        from memfit.llm.engine import EngineConfig, LLMEngine

        torch.set_num_threads(1)
        return LLMEngine(EngineConfig(model=str(model_dir), kv_budget="64MiB", dtype="float32",
                                      speculative_model="self:1", num_speculative_tokens=3))

    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=load) as live:
        r = httpx.post(live.url + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": [5, 17, 33, 80, 9], "max_tokens": 24, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        served = r.json()["usage"]["completion_tokens"]
        m = live.metrics()
    passes = m["memfit_spec_decode_verification_passes_total"]
    drafted, accepted = m["memfit_spec_decode_num_draft_tokens_total"], m["memfit_spec_decode_num_accepted_tokens_total"]
    emitted = m["memfit_spec_decode_num_emitted_tokens_total"]
    assert passes >= 1 and 0 <= accepted <= drafted <= 3 * passes
    assert emitted == accepted + passes  # one sequence: each pass adds its accepted drafts and one target token
    assert emitted <= served == 24  # the first token comes from the prefill, the rest from verification passes
    assert m["memfit_spec_decode_draft_kv_committed_bytes"] >= 0
