"""`LLM` (engine/api.py): a bad batch is refused whole, `chat` sessions reuse the conversation's KV, and the
arguments are checked as the server checks them. On a tiny random Llama with a chat template, built at test time."""
from __future__ import annotations

import pytest

from memfit.llm.engine.admission import EMPTY_MESSAGES
from memfit.llm.engine.api import LLM
from memfit.llm.engine.errors import QueueFull, RequestError
from memfit.llm.engine.params import SamplingParams
from tests.llm.tiny_models import make_tiny_model_dir

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("api"), family="llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    # no prefix caching: the cached tokens counted below come from the session alone
    return LLM(str(model_dir), dtype="float32", kv_budget="64MiB", max_model_len=128, enable_prefix_caching=False)


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting and not engine._seqs


@pytest.mark.parametrize("bad", [
    {"prompts": ["def f(x):", ""]},  # an empty prompt after a good one
    {"prompts": ["def f(x):", "x " * 200]},  # past the context
    {"prompt_token_ids": [[5, 6, 7], [10**6]]},  # outside the vocabulary
    {"prompts": ["def f(x):", "def g(y):"], "user": ["a", 5]},
    {"prompts": ["def f(x):", "def g(y):"], "priority": [0, "1"]},
])
def test_a_bad_prompt_anywhere_in_a_batch_queues_none_of_it(llm, bad):
    with pytest.raises(RequestError):
        llm.generate(sampling_params=GREEDY, **bad)
    assert_idle(llm)  # the review's repro left the good prompt queued, computed and dropped by the next call
    out = llm.generate(["def h(z):"], GREEDY)
    assert len(out) == 1 and len(out[0].token_ids) == 4


def test_a_batch_the_queue_cannot_hold_whole_is_refused_whole(model_dir):
    small = LLM(str(model_dir), dtype="float32", kv_budget="64MiB", max_model_len=128, max_waiting=2)
    with pytest.raises(QueueFull):
        small.generate(["a", "b", "c"], GREEDY)
    assert_idle(small)  # the two that fitted were aborted
    assert [len(o.token_ids) for o in small.generate(["a", "b"], GREEDY)] == [4, 4]


@pytest.mark.parametrize("user", [5, [5], ["u" * 257], "u" * 257, b"bytes"])
def test_a_user_that_is_not_a_short_string_is_refused_alike(llm, user):
    prompts = ["def f(x):"] if not isinstance(user, list) else ["def f(x):"] * len(user)
    with pytest.raises(RequestError, match="user"):
        llm.generate(prompts, GREEDY, user=user)
    with pytest.raises(RequestError, match="user"):
        llm.engine.add_request("def f(x):", GREEDY, user=user if not isinstance(user, list) else user[0])
    assert_idle(llm)


def test_chat_refuses_an_empty_conversation_as_the_server_does(llm):
    with pytest.raises(RequestError) as err:
        llm.chat([], GREEDY)
    assert str(err.value) == EMPTY_MESSAGES
    assert_idle(llm)


def test_chat_sessions_keep_the_conversations_kv_between_turns(llm):
    turn1 = [{"role": "user", "content": "def add(a, b):"}]
    first = llm.chat(turn1, GREEDY, session_id="conv")
    turn2 = turn1 + [{"role": "assistant", "content": first.outputs[0].text},
                     {"role": "user", "content": "and subtract?"}]
    second = llm.chat(turn2, GREEDY, session_id="conv")
    assert second.num_cached_tokens > 0  # the second turn's prompt starts from the first turn's KV
    assert llm.engine.kv.stats().num_seqs == 1  # held for the session between (and after) the turns
    llm.end_session("conv")
    assert llm.engine.kv.stats().num_seqs == 0
    # The same turns without a session: the same tokens, all prefilled.
    plain1, plain2 = llm.chat(turn1, GREEDY), llm.chat(turn2, GREEDY)
    assert plain2.num_cached_tokens == 0
    assert (plain1.outputs[0].token_ids, plain2.outputs[0].token_ids) == (first.outputs[0].token_ids,
                                                                           second.outputs[0].token_ids)


@pytest.mark.parametrize("session_id", ["", 5])
def test_chat_refuses_a_session_id_that_is_not_a_non_empty_string(llm, session_id):
    with pytest.raises(RequestError, match="session_id"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, session_id=session_id)
    assert_idle(llm)
