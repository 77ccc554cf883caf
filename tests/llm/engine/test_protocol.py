"""The engine's facade for servers (EngineClient): what it promises, checked on a real LLMEngine."""
from __future__ import annotations

import pytest

from memfit.llm.engine import EngineClient, LLMEngine, ModelInfo, RequestError, SamplingParams
from memfit.memory.budget import MemoryBudgetExceeded
from tests.llm.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("protocol"), family="llama", seed=11)
    eng = LLMEngine(model=str(path), device="cpu", kv_budget="64KiB", max_model_len=256, max_num_seqs=4, threads=1)
    yield eng
    eng.close()


def test_llm_engine_implements_the_protocol(engine):
    assert isinstance(engine, EngineClient)
    info = engine.model_info
    assert isinstance(info, ModelInfo)
    assert info.max_model_len == 256 and info.vocab_size == engine.model_config.vocab_size
    assert info.kv_cache == "virtual" and info.kv_budget_bytes == 64 * 2**10 and info.dtype == "float32"
    assert info.tokenizer.encode("abc") == engine.tokenizer.encode("abc")
    with pytest.raises(AttributeError):
        info.max_model_len = 1  # frozen: safe to read from the server's threads


def test_validate_refuses_what_add_request_refuses_and_changes_nothing(engine):
    before = engine.stats()
    with pytest.raises(RequestError, match="empty"):
        engine.validate([], SamplingParams())
    with pytest.raises(RequestError, match="integers in"):
        engine.validate([engine.model_info.vocab_size], SamplingParams())
    with pytest.raises(RequestError, match="context"):
        engine.validate([1] * 256, SamplingParams())
    with pytest.raises(MemoryBudgetExceeded, match="KV cache's share"):
        engine.validate([1] * 10, SamplingParams(max_tokens=240))  # 250 tokens of KV > 64 KiB
    engine.validate([1, 2, 3], SamplingParams(max_tokens=4))
    assert engine.stats() == before and not engine.has_unfinished_requests()


def test_max_new_tokens_is_the_longest_that_fits(engine):
    n = engine.max_new_tokens(10)
    assert 1 <= n < 256 - 10  # the 64 KiB budget, not the context, is the limit here
    engine.validate([1] * 10, SamplingParams(max_tokens=n))  # fits
    with pytest.raises(MemoryBudgetExceeded):
        engine.validate([1] * 10, SamplingParams(max_tokens=n + 1))  # one more does not
    roomy = engine.kv.bytes_needed(256) <= engine.model_info.kv_budget_bytes
    assert roomy or engine.max_new_tokens(250) <= 6


def test_abort_frees_and_ignores_unknown_ids(engine):
    rid = engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50, seed=3, temperature=1.0))
    engine.step()
    assert engine.stats()["num_running"] == 1 and engine.runner.sampler.num_generators == 1
    engine.abort(rid)
    engine.abort(rid)  # twice: ignored
    engine.abort("never-seen")
    assert not engine.has_unfinished_requests() and engine.runner.sampler.num_generators == 0


def test_seeded_requests_keep_their_generator_until_they_finish(engine):
    params = SamplingParams(max_tokens=6, seed=1234, temperature=1.0, ignore_eos=True)
    first = [engine.add_request(prompt_token_ids=[9, 8, 7], params=params) for _ in range(2)]
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.token_ids
    # Same seed, same prompt: same tokens, each drawn from the request's own generator.
    assert outs[first[0]] == outs[first[1]] and len(outs[first[0]]) == 6
    assert engine.runner.sampler.num_generators == 0


def test_budget_failure_names_the_request(engine):
    exc = MemoryBudgetExceeded("no room", request_id="r-7")
    assert exc.request_id == "r-7" and str(exc) == "no room"
    assert MemoryBudgetExceeded("plain").request_id is None
