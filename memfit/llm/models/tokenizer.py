"""Tokenizer, chat template and generation defaults of a Hugging Face model directory.

Tokenization itself is the `tokenizers` library (tokenizer.json); chat templates are rendered with jinja2
in a sandbox, with the same variables and helpers Hugging Face provides (`bos_token`, `eos_token`,
`raise_exception`, ...), so a model's own template works unchanged. `IncrementalDetokenizer` turns a stream
of token ids into text without ever emitting half of a multi-byte character.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from memfit.llm.models.config import ModelFormatError, _is_int, _is_number


# Text longer than this is encoded with the GIL released (Tokenizer.encode); shorter text through the single-text
# call, which holds it for too short a time to matter.
GIL_FREE_CHARS = 16384


class ChatTemplateError(ValueError):
    """The model has no chat template, or its template rejected the messages."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ModelFormatError(f"{where} must be a token id (integer) or a list of them, got {value!r}")


@dataclass
class GenerationDefaults:
    """The model author's sampling defaults (generation_config.json); None where the file says nothing."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> GenerationDefaults:
        raw = _read_json(Path(path) / "generation_config.json")
        where = "generation_config.json: {}"

        def num(key: str, kind: type) -> Any:
            value = raw.get(key)
            if value is None:
                return None
            # A JSON number, not what float() or int() would turn into one: true (1.0), "0.7"; an integer field a
            # whole number (40.0 is 40), not 40.5 cut to 40. Refused naming the file and the field.
            if not _is_number(value) or (kind is int and not _is_int(value) and not value.is_integer()):
                what = "an integer" if kind is int else "a number"
                raise ModelFormatError(f"{Path(path) / 'generation_config.json'}: {key} must be {what}, got "
                                       f"{value!r}; correct or remove it")
            return kind(value)

        pad = _id_list(raw.get("pad_token_id"), where.format("pad_token_id"))
        bos = _id_list(raw.get("bos_token_id"), where.format("bos_token_id"))
        return cls(
            do_sample=raw.get("do_sample"),
            temperature=num("temperature", float),
            top_p=num("top_p", float),
            top_k=num("top_k", int),
            repetition_penalty=num("repetition_penalty", float),
            max_new_tokens=num("max_new_tokens", int),
            eos_token_ids=_id_list(raw.get("eos_token_id"), where.format("eos_token_id")),
            bos_token_id=bos[0] if bos else None,
            pad_token_id=pad[0] if pad else None,
        )


def _load_chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The default chat template: tokenizer_config.json's `chat_template` (a string, or a list of named
    templates), else chat_template.jinja / chat_template.json (where newer transformers save it)."""
    template = tok_cfg.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """A model's tokenizer: encode/decode, special token ids, chat template."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelFormatError(
                f"{tok_file} not found: memfit needs a fast tokenizer (tokenizer.json). Create one with "
                "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        try:
            self._tok = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelFormatError(f"{tok_file} could not be read: {exc}") from exc
        tok_cfg = _read_json(self.path / "tokenizer_config.json")
        self.generation = GenerationDefaults.from_dir(self.path)
        model_cfg = _read_json(self.path / "config.json")

        self.special_tokens = {
            k: _token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.bos_token, self.eos_token = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        self.bos_token_id = self._id_of(self.bos_token)
        if self.bos_token_id is None:
            self.bos_token_id = self.generation.bos_token_id
        # Stop ids: generation_config's (often a list: Llama 3 ends turns with <|eot_id|>), the tokenizer's
        # eos_token, then config.json's; order kept, duplicates dropped.
        eos: list[int] = list(self.generation.eos_token_ids)
        eos_tok = self._id_of(self.eos_token)
        eos += [eos_tok] if eos_tok is not None else []
        eos += _id_list(model_cfg.get("eos_token_id"), "config.json: eos_token_id")
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        pad = self._id_of(self.special_tokens["pad_token"])
        self.pad_token_id = pad if pad is not None else self.generation.pad_token_id
        self.chat_template = _load_chat_template(self.path, tok_cfg)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        return cls(path)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # undecodable bytes from argv or stdin (surrogate escapes)
                raise ValueError(f"the text is not valid UTF-8: character {exc.start} is an undecodable byte "
                                 f"({text[exc.start:exc.end]!r}); pass UTF-8 text") from None
        if len(text) > GIL_FREE_CHARS:
            # tokenizers' single-text encode keeps the GIL for its whole run (3.4 s for 4 MB here: a server's event
            # loop stopped that long although the text was tokenized on a worker thread); its batch encode releases
            # it (the loop's longest pause 0.17 s; benchmarks/serve_long_prompt.py)
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        The result already holds any BOS token the template writes, so encode it with
        add_special_tokens=False.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError(
                f"the model in {self.path} has no chat template (no chat_template in tokenizer_config.json or "
                "chat_template.jinja); send a plain completion prompt instead, or pass chat_template="
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
        variables = {**self.special_tokens, **extra}  # callers may add tools=, documents=, or override tokens
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)

    def incremental_detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


def render_chat_template(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render a HF chat template in jinja2's immutable sandbox (templates come with downloaded models)."""
    import jinja2

    try:
        compiled = _compile_chat_template(template)
        return compiled.render(messages=messages, **variables)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template could not be rendered: {exc}") from exc


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> Any:
    """Compile once per template: compiling costs ~12 ms, rendering ~0.1 ms (a fine-tuning run renders each
    conversation turn by turn, thousands of times)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template rejected the messages: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # HF's tojson keeps non-ASCII text as is (jinja2's default escapes it to \uXXXX and HTML-escapes).
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class IncrementalDetokenizer:
    """Streaming decode: `push(new_ids)` returns only the text those ids complete.

    Decoding one token at a time breaks text: a byte-level token may hold half of a UTF-8 character, and
    SentencePiece-style decoders drop a leading space at the start of a decode. So we keep two offsets into
    the token list (as vLLM and TGI do): text is decoded from `prefix_offset`, a few tokens *before* the
    new ones, for context; what that decode adds beyond the already-emitted part (`prefix_offset` to
    `read_offset`) is the new text, held back while it ends in an incomplete character (U+FFFD).
    """

    # Tokens of context decoded before the new ones: enough for any decoder's leading-space handling.
    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT, 0)
        self.text = ""  # everything emitted so far (generated text only, not the prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the newly completed text ('' while a character is incomplete)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # nothing new yet, or the last token ends mid-character: wait for the next one
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: emit whatever is held back (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
