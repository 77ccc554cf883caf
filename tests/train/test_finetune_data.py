"""Fine-tuning data: both formats, the assistant-only mask, malformed records and truncation counted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from memfit.llm.models.tokenizer import Tokenizer
from memfit.train.finetune.data import (
    IGNORE,
    DataFormatError,
    batch_indices,
    build_examples,
    collate,
)

TINY = Path(__file__).resolve().parents[2] / "memfit" / "assets" / "models" / "memfit-tiny"
SHAREGPT = Path("/work/shared/data/dummy_conversation.json")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TINY)


def _assistant_text(tok: Tokenizer, ex) -> str:
    """Decode the tokens the loss covers (labels are the next token: shift back by one)."""
    ids = [lab for lab in ex.labels if lab != IGNORE]
    return tok.decode(ids, skip_special_tokens=False)


def test_chat_jsonl_loss_covers_assistant_turns_only(tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]}) + "\n")
    (ex,), stats = build_examples(data, tok, 512)
    # Independent check: the rendered conversation's assistant parts, as the template writes them.
    assert _assistant_text(tok, ex) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    full = tok.apply_chat_template(json.loads(data.read_text())["messages"], add_generation_prompt=False)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == full
    assert stats.used == 1 and stats.malformed == 0


def test_sharegpt_file(tok):
    examples, stats = build_examples(SHAREGPT, tok, 4096)
    assert stats.records == stats.used == len(examples) > 100
    first = json.loads(SHAREGPT.read_text())[0]["conversations"]
    gpt = "".join(t["value"] + "<|im_end|>\n" for t in first if t["from"] == "gpt")
    assert _assistant_text(tok, examples[0]) == gpt


def test_malformed_lines_are_skipped_counted_and_reported(tok, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([
        good,
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
        json.dumps({"text": "neither format"}),
        json.dumps({"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "x"}]}),
        good,
    ]) + "\n")
    examples, stats = build_examples(data, tok, 256)
    assert len(examples) == stats.used == 2
    assert stats.malformed == 4 and stats.records == 6
    assert stats.malformed_where[0].startswith("line 2: invalid JSON")
    assert any("no assistant turn" in w for w in stats.malformed_where)


def test_truncation_without_assistant_token_is_skipped_not_nan(tok, tmp_path):
    long_prompt = "word " * 200
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                       {"role": "assistant", "content": "ok"}]})
                              for p in (long_prompt, "short")) + "\n")
    examples, stats = build_examples(data, tok, 32)
    assert stats.no_assistant_after_truncation == 1 and stats.used == 1 and stats.truncated == 1
    assert all(any(lab != IGNORE for lab in e.labels) for e in examples)
    with pytest.raises(DataFormatError, match="raise --seq-len"):
        build_examples(_only(data, tmp_path), tok, 32)


def test_a_data_directory_is_named_as_one_not_as_missing(tok, tmp_path):
    """--data DIR, a folder that exists, was refused as 'data file DIR not found'."""
    with pytest.raises(DataFormatError, match="--data .* is a directory, not a file; pass --data one ShareGPT"):
        build_examples(tmp_path, tok, 32)
    with pytest.raises(DataFormatError, match="not found"):  # a path that is not there still says so
        build_examples(tmp_path / "nope.jsonl", tok, 32)


def _only(data: Path, tmp: Path) -> Path:
    out = tmp / "only.jsonl"
    out.write_text(data.read_text().splitlines()[0] + "\n")
    return out


def test_data_order_is_seeded_epoch_permutations():
    n, b = 7, 3
    order = [i for step in range(7) for i in batch_indices(n, b, step, seed=5)]  # 21 = three epochs
    for epoch in range(3):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert order == [i for step in range(7) for i in batch_indices(n, b, step, seed=5)]
    assert order != [i for step in range(7) for i in batch_indices(n, b, step, seed=6)]


def test_collate_pads_with_ignored_labels(tok, tmp_path):
    from memfit.train.finetune.data import Example

    ids, labels = collate([Example([1, 2, 3], [2, 3, IGNORE]), Example([4], [IGNORE])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert labels.tolist() == [[2, 3, IGNORE], [IGNORE] * 3]
