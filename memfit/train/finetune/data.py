"""Chat data for fine-tuning: ShareGPT JSON or chat JSONL -> token ids with an assistant-only loss mask.

Accepted inputs (one conversation per record):
- ShareGPT: a JSON array (or JSONL lines) of `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`;
- chat: JSONL lines (or a JSON array) of `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}`.

A record that is not valid JSON or not one of these shapes is skipped and counted (with its line or index),
never fatal. Each conversation is rendered with the model's own chat template, piece by piece: the text up
to each assistant turn (with the generation prompt) and the assistant turn itself, so every token is known
to be the assistant's or not without guessing from offsets. The loss covers assistant tokens only (their
content and the template's end-of-turn marker, so the model learns to stop).

An example cut at `seq_len` that keeps no assistant token would give a loss over zero tokens (0/0 = NaN): it
is skipped and counted instead.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memfit.llm.models.tokenizer import Tokenizer

IGNORE = -100  # label of a position the loss skips (torch's cross_entropy ignore_index default)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class DataFormatError(ValueError):
    """The data file can't be used at all (missing, empty, no usable conversation)."""


@dataclass
class DataStats:
    records: int = 0
    used: int = 0
    malformed: int = 0
    malformed_where: list[str] = field(default_factory=list)  # first few "line 7: reason"
    no_assistant_after_truncation: int = 0
    truncated: int = 0

    def note_malformed(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_where) < 10:
            self.malformed_where.append(f"{where}: {reason}")

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "used": self.used, "malformed": self.malformed,
                "malformed_examples": self.malformed_where, "truncated": self.truncated,
                "skipped_no_assistant_token": self.no_assistant_after_truncation}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # labels[t] = input_ids[t + 1] where that token is the assistant's, else IGNORE


def _messages(record: Any) -> list[dict[str, str]]:
    """A record -> [{"role", "content"}]; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise ValueError("has neither 'messages' nor 'conversations'")
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation is not a non-empty list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ValueError(f"a turn lacks a string {text_key!r}")
        role = _ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise ValueError(f"unknown role {turn.get(role_key)!r}")
        out.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant turn")
    return out


def read_records(path: Path, stats: DataStats) -> list[tuple[str, list[dict[str, str]]]]:
    """(where, messages) for every well-formed record of a JSON array or a JSONL file."""
    if path.is_dir():  # the data set is one file: a folder of them is not read
        raise DataFormatError(f"--data {path} is a directory, not a file; pass --data one ShareGPT .json or chat "
                              ".jsonl file")
    if not path.is_file():
        raise DataFormatError(f"data file {path} not found; pass --data with a ShareGPT .json or chat .jsonl file")
    text = path.read_text(encoding="utf-8", errors="replace")
    raw: list[tuple[str, Any]] = []
    stripped = text.lstrip()
    whole = None
    if stripped.startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # maybe JSONL whose first line is an array: fall through to line by line
    if isinstance(whole, list):
        raw = [(f"record {i}", r) for i, r in enumerate(whole)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raw.append((f"line {n}", exc))
    out = []
    for where, record in raw:
        stats.records += 1
        if isinstance(record, json.JSONDecodeError):
            stats.note_malformed(where, f"invalid JSON ({record.msg})")
            continue
        try:
            out.append((where, _messages(record)))
        except ValueError as exc:
            stats.note_malformed(where, str(exc))
    return out


def tokenize_conversation(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is the assistant's."""
    ids: list[int] = []
    mine: list[bool] = []
    done = ""  # text rendered so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        reply = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not reply.startswith(prompt):
            raise ValueError("the chat template does not render the conversation turn by turn as a prefix")
        for piece, is_assistant in ((prompt[len(done):], False), (reply[len(prompt):], True)):
            if piece:
                new = tok.encode(piece, add_special_tokens=False)
                ids += new
                mine += [is_assistant] * len(new)
        done = reply
    return ids, mine


def build_examples(path: Path, tok: Tokenizer, seq_len: int) -> tuple[list[Example], DataStats]:
    """Read, tokenize and truncate every conversation in `path` to at most `seq_len` tokens."""
    stats = DataStats()
    examples = []
    for where, messages in read_records(path, stats):
        try:
            ids, mine = tokenize_conversation(tok, messages)
        except ValueError as exc:  # ChatTemplateError is a ValueError too
            stats.note_malformed(where, str(exc))
            continue
        if len(ids) > seq_len:
            stats.truncated += 1
            ids, mine = ids[:seq_len], mine[:seq_len]
        labels = [ids[t + 1] if mine[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        if all(lab == IGNORE for lab in labels):
            stats.no_assistant_after_truncation += 1
            continue
        examples.append(Example(ids, labels))
    stats.used = len(examples)
    if not examples:
        raise DataFormatError(
            f"{path}: no usable conversation ({stats.records} records, {stats.malformed} malformed, "
            f"{stats.no_assistant_after_truncation} without an assistant token within --seq-len {seq_len}); "
            "check the format (ShareGPT 'conversations' or chat 'messages') or raise --seq-len"
        )
    return examples, stats


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of global step `step`: epochs of seeded permutations laid end to end, so any step's batch
    is known from (seed, step) alone (a resumed run sees exactly the batches an uninterrupted one does)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_examples)
        out.append(_epoch_order(n_examples, seed, epoch)[pos])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_examples, generator=gen).tolist())


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids, labels), each (B, T). Padding is never attended to by a
    real token (causal attention only looks back) and is labelled IGNORE."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels
