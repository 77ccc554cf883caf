"""memfit.llm.models.tokenizer: encode/decode, streaming detokenization, chat templates, generation defaults."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memfit.llm.models import ModelFormatError
from memfit.llm.models.tokenizer import (
    ChatTemplateError,
    GenerationDefaults,
    Tokenizer,
    render_chat_template,
)
from tests.llm.tiny_models import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    train_tokenizer,
    write_tokenizer_files,
)

TEXTS = [
    "Hello world! memfit runs models inside a memory budget.",
    "Grüße aus München 🙂🚀 日本語のテキスト, naïve café.",
    "  leading spaces and\nnew lines\ttabs  ",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Grüße 🙂"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(path, train_tokenizer())
    return path


@pytest.fixture
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture
def edit_dir(tok_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tok_dir, tmp_path / "t"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- encode / decode ----------------------------------------------------------------------------------------


def test_encode_decode_roundtrip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids, skip_special_tokens=False) == text
    ids = tok.encode(TEXTS[3])
    assert ids[0] == tok.encode("<|im_start|>", add_special_tokens=False)[0] == 1  # a special token is one id
    assert "<|im_start|>" not in tok.decode(ids) and "special tokens inline" in tok.decode(ids)


def test_long_text_is_encoded_without_holding_the_gil(tok):
    """The server tokenizes a long prompt on a worker thread so that its event loop keeps serving; that holds only
    if the tokenizer releases the GIL while it encodes, which tokenizers' single-text encode does not (a 4 MB
    prompt stopped /health for 3.4 s). Measured independently of the code, as a server waits: the longest extra
    pause of a coroutine that sleeps 10 ms at a time while another thread encodes about 1 MB, against the encode's
    own time."""
    import asyncio
    import time

    from memfit.llm.models.tokenizer import GIL_FREE_CHARS

    text = "The quick brown fox jumps over the lazy dog; def f(x): return x * 2\n" * 16000
    assert len(text) > GIL_FREE_CHARS

    async def main() -> tuple[float, float, list[int]]:
        longest, done = 0.0, False

        async def ticker() -> None:
            nonlocal longest
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                longest, last = max(longest, now - last - 0.01), now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        ids = await asyncio.to_thread(tok.encode, text)
        took = time.perf_counter() - t0
        done = True
        await task
        return longest, took, ids

    longest, took, ids = asyncio.run(main())
    assert ids == tok._tok.encode(text).ids  # the same ids as the single-text call
    # held, the loop's longest pause is the whole encode; released, a few scheduling slices
    assert longest < 0.5 * took, (longest, took)


def test_text_that_is_not_utf8_is_a_value_error(tok):
    # what Python makes of the bytes b"\xff\xfe" in argv or stdin: surrogate escapes, which the tokenizers
    # library refused with 'TypeError: TextInputSequence must be str' (a traceback in `memfit generate`)
    undecodable = b"\xff\xfe hi".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="not valid UTF-8: character 0"):
        tok.encode(undecodable)
    assert len(tok.encode("h\u00e9llo \u4e16\u754c")) > 0  # real non-ASCII text still encodes


def test_matches_transformers_tokenizer(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text)
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        for gen in (True, False):
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == hf.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen
            )


def test_add_special_tokens_uses_the_post_processor(tmp_path):
    from tokenizers import processors

    hf_tok = train_tokenizer()
    hf_tok.add_special_tokens(["<s>"])
    bos = hf_tok.token_to_id("<s>")
    hf_tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    write_tokenizer_files(tmp_path, hf_tok)
    _edit_json(tmp_path / "tokenizer_config.json", bos_token={"content": "<s>", "special": True})
    tok = Tokenizer(tmp_path)
    assert tok.bos_token == "<s>" and tok.bos_token_id == bos
    assert tok.encode("hi")[0] == bos
    assert tok.encode("hi", add_special_tokens=False)[0] != bos
    assert tok.decode(tok.encode("hi")) == "hi"


# --- special ids and generation defaults ---------------------------------------------------------------------


def test_special_ids_and_generation_defaults(tok):
    im_end, eot = tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == [im_end, eot] and tok.eos_token_id == im_end
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.pad_token_id == eot
    gen = tok.generation
    assert gen == GenerationDefaults(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=64, eos_token_ids=[im_end, eot],
        pad_token_id=eot,
    )


def test_eos_from_every_source_deduplicated(edit_dir):
    # generation_config says one id, tokenizer_config a token given as an AddedToken dict, config.json another.
    _edit_json(edit_dir / "generation_config.json", eos_token_id=0)
    _edit_json(edit_dir / "tokenizer_config.json", eos_token={"content": "<|im_end|>", "lstrip": False})
    (edit_dir / "config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert Tokenizer(edit_dir).eos_token_ids == [0, 2, 1]


def test_generation_defaults_without_file(tmp_path):
    assert GenerationDefaults.from_dir(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ModelFormatError, match="generation_config.json: eos_token_id must be a token id"):
        GenerationDefaults.from_dir(tmp_path)


@pytest.mark.parametrize("field, value, kind", [("temperature", "hot", "a number"), ("top_p", [0.9], "a number"),
                                               ("top_k", "many", "an integer"),
                                               # what float() and int() took: true as 1.0, a numeric string,
                                               # 40.5 cut to 40
                                               ("temperature", True, "a number"), ("top_p", False, "a number"),
                                               ("temperature", "0.7", "a number"), ("top_k", 40.5, "an integer"),
                                               ("top_k", "40", "an integer"), ("max_new_tokens", True, "an integer"),
                                               ("max_new_tokens", float("inf"), "an integer"),
                                               ("repetition_penalty", {"x": 1}, "a number")])
def test_a_sampling_default_that_is_not_a_number_names_the_file_and_field(field, value, kind, tmp_path):
    """temperature "hot" was refused as float()'s bare "could not convert string to float: 'hot'" (a list was a
    TypeError's traceback); true, "0.7" and top_k 40.5 were taken as 1.0, 0.7 and 40."""
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ModelFormatError) as info:
        GenerationDefaults.from_dir(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'generation_config.json'}: {field} must be {kind}, got {value!r}; "
                               "correct or remove it")


def test_sampling_defaults_take_json_numbers_and_whole_floats_for_integers(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 1, "top_p": 0.9, "top_k": 40.0, "max_new_tokens": 256, "repetition_penalty": 1.1}))
    d = GenerationDefaults.from_dir(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.max_new_tokens, d.repetition_penalty) == (1.0, 0.9, 40, 256, 1.1)
    assert type(d.temperature) is float and type(d.top_k) is int and type(d.max_new_tokens) is int


def test_missing_or_broken_tokenizer_files(edit_dir):
    (edit_dir / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ModelFormatError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer(edit_dir)
    (edit_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json not found"):
        Tokenizer(edit_dir)


# --- chat templates --------------------------------------------------------------------------------------------


def test_chatml_rendering(tok):
    text = tok.apply_chat_template(CHATS[0])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(CHATS[0], add_generation_prompt=False).endswith("assistant\n")


def test_template_variables_and_raise_exception(tok):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
        "{{ messages | tojson }}"
    )
    out = tok.apply_chat_template(
        [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "ü"}], chat_template=template,
        bos_token="<B>",
    )
    assert out.startswith("<B>[user] hi<|im_end|>\n[assistant] ü<|im_end|>\n")
    assert '"content": "ü"' in out  # tojson keeps non-ASCII as HF's does
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=template)


def test_no_chat_template_is_a_clear_error(edit_dir):
    _edit_json(edit_dir / "tokenizer_config.json", chat_template=None)
    tok = Tokenizer(edit_dir)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])


def test_template_from_jinja_file_and_named_list(edit_dir):
    _edit_json(edit_dir / "tokenizer_config.json", chat_template=None)
    (edit_dir / "chat_template.jinja").write_text("J:{{ messages[0]['content'] }}")
    assert Tokenizer(edit_dir).apply_chat_template(CHATS[0]) == "J:Hi there"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D:{{ messages | length }}"}]
    _edit_json(edit_dir / "tokenizer_config.json", chat_template=named)
    assert Tokenizer(edit_dir).apply_chat_template(CHATS[1]) == "D:4"


def test_templates_run_sandboxed():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError):  # no reaching Python internals from a downloaded template
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(ChatTemplateError):  # immutable: a template cannot modify the caller's messages
        render_chat_template("{% set _ = messages.append(1) %}", msgs)
    assert msgs == [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="could not be rendered"):
        render_chat_template("{% for %}", msgs)


def test_bad_messages(tok):
    with pytest.raises(ChatTemplateError, match="list of"):
        tok.apply_chat_template("hello")  # type: ignore[arg-type]


# --- streaming detokenization -------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), **kw) -> list[str]:
    det = tok.incremental_detokenizer(prompt, **kw)
    pieces = [det.push([i]) for i in ids]
    pieces.append(det.flush())
    assert det.text == "".join(pieces)
    return pieces


def test_streaming_never_splits_a_character(tok):
    text = TEXTS[1]
    ids = tok.encode(text)
    # The test is meaningful: decoding token by token *does* split characters with this tokenizer.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens were held back until their character completed


def test_streaming_after_a_prompt_and_in_chunks(tok):
    prompt, gen = tok.encode("Grüße 🙂"), tok.encode(" 日本語 and more 🚀!")
    pieces = _stream(tok, gen, prompt=prompt)
    assert "".join(pieces) == tok.decode(gen)
    det = tok.incremental_detokenizer(prompt)
    out = det.push(gen[:3]) + det.push(gen[3:7]) + det.push(gen[7:]) + det.flush()
    assert out == tok.decode(gen)


def test_streaming_special_tokens(tok):
    ids = tok.encode("ok<|im_end|>")
    assert "".join(_stream(tok, ids)) == "ok"
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == "ok<|im_end|>"


def test_flush_emits_an_incomplete_character(tok):
    det = tok.incremental_detokenizer()
    first_byte = next(i for i in tok.encode("🙂") if "\ufffd" in tok.decode([i]))
    assert det.push([first_byte]) == ""
    assert det.flush() == "\ufffd"


def test_streaming_keeps_spaces_with_a_sentencepiece_style_decoder(tmp_path):
    """Llama-2 style decoders strip the leading space of every decode; streaming must still keep spaces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    raw.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 3,
        trainers.BpeTrainer(vocab_size=60, special_tokens=SPECIAL_TOKENS, show_progress=False),
    )
    write_tokenizer_files(tmp_path, raw)
    tok = Tokenizer(tmp_path)
    text = "the lazy fox jumps over the quick dog"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "".join(tok.decode([i]) for i in ids) != text  # naive per-token decoding loses the spaces
    assert "".join(_stream(tok, ids)) == text
    # After a prompt, the first generated word keeps its leading space.
    prompt_len = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]) == "the")
    assert "".join(_stream(tok, ids[prompt_len:], prompt=ids[:prompt_len])) == text[len("the") :]


def test_chatml_template_constant_is_what_the_dir_holds(tok_dir):
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
