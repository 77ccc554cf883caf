"""`LLM`: offline batch generation, in the convention people know from vLLM.

    from memfit.llm import LLM, SamplingParams
    llm = LLM(model="memfit-tiny", kv_cache="virtual", kv_budget="256MiB", dtype="float32")
    outs = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text)
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

from memfit.llm.engine.config import OFFLINE_CPU_STEP_TOKENS, EngineConfig
from memfit.llm.engine.admission import check_messages, check_priority, check_user
from memfit.llm.engine.errors import RequestError
from memfit.llm.engine.llm_engine import LLMEngine
from memfit.llm.engine.outputs import RequestOutput
from memfit.llm.engine.params import SamplingParams


class LLM:
    def __init__(self, model: str = "memfit-tiny", **engine_options) -> None:
        """engine_options: EngineConfig's fields. Offline on a CPU, with neither max_num_batched_tokens nor a
        memory_budget given, a step takes up to OFFLINE_CPU_STEP_TOKENS tokens (the server's default is 512:
        see config.py); under a memory budget the smaller step's reservation leaves the KV cache more room."""
        config = EngineConfig(model=model).with_overrides(**engine_options)
        if offline_step_applies(config, engine_options):
            step = offline_step_tokens(config.max_num_batched_tokens, config.max_num_seqs, config.max_model_len)
            config = config.with_overrides(max_num_batched_tokens=step)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Seq[str] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        prompt_token_ids: Seq[Seq[int]] | None = None,
        use_tqdm: bool = False,
        priority: int | Seq[int] = 0,
        user: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings, or token id lists); outputs come back in prompt order.

        priority: one integer for all prompts or one per prompt (lower = more urgent; the `priority` scheduling
        policy uses it); user: whose requests these are (the `vtc` policy shares service between users)."""
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("give prompts or prompt_token_ids, not both")
        if isinstance(prompts, str):
            prompts = [prompts]
        items: list[tuple[str | None, list[int] | None]]
        if prompt_token_ids is not None:
            items = [(None, list(ids)) for ids in prompt_token_ids]
        elif prompts is not None:
            items = [(p, None) for p in prompts]
        else:
            raise ValueError("give prompts or prompt_token_ids")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"{len(params)} sampling params for {len(items)} prompts")
        priorities = _per_prompt(priority, len(items), "priority", int, check_priority)
        users = _per_prompt(user, len(items), "user", (str, type(None)), check_user)
        # Validate everything before queueing anything, so a bad prompt does not leave half a batch queued (the
        # next generate() would compute the leftovers and drop their outputs).
        ids = []
        for (text, toks), p, prio, u in zip(items, params, priorities, users):
            check_priority(prio)
            check_user(u)
            t = toks if toks is not None else self.tokenizer.encode(text)
            self.engine.validate(t, p or SamplingParams())
            ids.append(t)
        order = self._add_all([dict(prompt_token_ids=t, params=p, priority=prio, user=u)
                               for t, p, prio, u in zip(ids, params, priorities, users)])
        return self._run(order, [t for t, _ in items], use_tqdm)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None, priority: int = 0,
             user: str | None = None, session_id: str | None = None) -> RequestOutput:
        """One assistant turn for `messages`. session_id: keep this conversation's KV after the turn, so the next
        call with the same id (the whole conversation so far plus the new message) prefills only what is new, as
        the server's X-Session-Id does; `end_session(session_id)` frees it."""
        check_messages(messages)
        check_priority(priority)
        check_user(user)
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise RequestError(f"session_id must be a non-empty string (or None), got {session_id!r:.60}")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        rid = self.engine.add_request(prompt_token_ids=ids, params=sampling_params, priority=priority, user=user,
                                      session_id=session_id)
        return self._run([rid], [prompt], False)[0]

    def end_session(self, session_id: str) -> None:
        """Free the KV kept for `session_id` (LLM.chat's session_id); an unknown id is ignored."""
        self.engine.end_session(session_id)

    def _add_all(self, requests: list[dict]) -> list[str]:
        """add_request for each; if one is still refused (the queue's limit), the ones added are aborted: all or none."""
        added: list[str] = []
        try:
            for kw in requests:
                added.append(self.engine.add_request(**kw))
        except BaseException:
            for rid in added:
                self.engine.abort(rid)
            raise
        return added

    def _run(self, order: list[str], prompts: list[str | None], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(order), desc="generate", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        finally:
            if progress is not None:
                progress.close()
        results = [done[rid] for rid in order]
        for out, text in zip(results, prompts):
            out.prompt = text
        return results


def _per_prompt(value, n: int, name: str, kind, check) -> list:
    """One value for every prompt, or a list of one per prompt; `check` refuses a single value of another type
    with the same error as a bad element of a list would get."""
    if isinstance(value, kind) or value is None:
        return [value] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Seq):
        check(value)
        raise TypeError(f"{name} must be one value or a list of one per prompt, got {value!r}")
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} values for {n} prompts")
    return values


def offline_step_tokens(default_step: int, max_num_seqs: int, max_model_len: int | None) -> int:
    """The offline API's CPU step: OFFLINE_CPU_STEP_TOKENS, but no more rows than every sequence's whole context
    (no step can form a larger one, so none is reserved), and never below the engine's own default step."""
    if not max_model_len:
        return OFFLINE_CPU_STEP_TOKENS
    return min(OFFLINE_CPU_STEP_TOKENS, max(default_step, max_num_seqs * max_model_len))


def offline_step_applies(config: EngineConfig, given: dict) -> bool:
    """Whether the offline API's larger CPU step replaces the engine's default: on a CPU, when the caller set
    neither the step size nor a memory budget."""
    return ("max_num_batched_tokens" not in given and config.memory_budget is None
            and config.resolved_device().type == "cpu")
