"""benchmarks.multiturn: MT-Bench messages on a random-initialised shape keep the bundled tokenizer's lengths."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import multiturn
from memfit.llm.models.loader import resolve_model_path
from memfit.llm.models.tokenizer import Tokenizer


class Placeholder:
    """The one-word tokenizer benchmarks/decode_setup.py writes for a random shape: every text is one token."""

    vocab_size = 1

    def encode(self, text: str) -> list[int]:
        return [0]


def args(**kw) -> argparse.Namespace:
    base = dict(seed=0, requests=4, rate=1.0, prompt_median=64, prompt_max=128, output_max=16, history_max=4096)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.skipif(not multiturn.MT_BENCH.exists(), reason="MT-Bench questions not present")
def test_placeholder_tokenizer_gets_the_bundled_tokenizers_lengths_in_the_models_vocab():
    vocab = 151936
    convs = multiturn.conversations(args(), Placeholder(), vocab)
    mt = [json.loads(line)["turns"] for line in multiturn.MT_BENCH.read_text().splitlines() if line.strip()]
    real = Tokenizer.from_dir(resolve_model_path("memfit-tiny"))
    checked = 0
    for i, c in enumerate(convs):
        if c["kind"] != "mt-bench":
            continue
        texts = mt[(i // 2) % len(mt)]
        # turn 1 carries the random system prompt in front of the message; turn 2 is the message alone
        assert len(c["turns"][1]) == len(real.encode(texts[1])) > 1
        assert len(c["turns"][0]) > len(real.encode(texts[0]))
        assert all(3 <= t < vocab for turn in c["turns"] for t in turn)
        checked += 1
    assert checked == 2


def test_a_real_tokenizer_is_used_as_is():
    real = Tokenizer.from_dir(resolve_model_path("memfit-tiny"))
    enc = multiturn.message_tokens(real, real.vocab_size, __import__("random").Random(0))
    assert enc("What is a swap?") == real.encode("What is a swap?")
