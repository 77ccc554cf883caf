"""scripts/train_default_model.py: the large target's config and default output, and distilling a draft on a
target's logits (--distil-from, --init-from) on a small text, a few steps."""
from __future__ import annotations

import importlib.util
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from memfit.llm.models.config import ModelConfig
from memfit.llm.models.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "memfit" / "assets" / "models" / "memfit-tiny"
DRAFT = ROOT / "memfit" / "assets" / "models" / "memfit-tiny-draft"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "scripts" / "train_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def small_corpus(script, monkeypatch):
    """A few stdlib files instead of the whole stdlib, so a run takes seconds."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py", "textwrap.py")]
    monkeypatch.setattr(script, "collect_sources", lambda _root: (texts[:2], texts[2:], ["textwrap.py"]))


def test_large_size_is_tens_of_millions_with_the_same_shape_rules(script, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    args = script.parse_args(["--size", "large", "--tokenizer", str(TINY)])
    assert args.out == tmp_path / "models" / "memfit-large"  # the user's cache: not bundled
    with pytest.raises(SystemExit):  # the bundled sizes still need --out
        script.parse_args(["--size", "draft"])
    tiny = json.loads((TINY / "config.json").read_text())
    shape = script.SIZES["large"]
    cfg = ModelConfig(vocab_size=tiny["vocab_size"], max_position_embeddings=script.MAX_POSITIONS,
                      tie_word_embeddings=True, **shape)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert 20e6 <= n <= 30e6
    assert shape["head_dim"] == 32 and shape["num_attention_heads"] == 2 * shape["num_key_value_heads"]
    assert script.MAX_POSITIONS == tiny["max_position_embeddings"]


def test_distil_raises_agreement_with_the_target(script, small_corpus, tmp_path):
    out = tmp_path / "draft"
    rc = script.main(["--size", "draft", "--out", str(out), "--distil-from", str(TINY), "--steps", "40",
                      "--seq-len", "32", "--batch-size", "4", "--eval-windows", "4", "--eval-every", "20",
                      "--warmup", "5"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "kl_to_target" and log["distil_from"] == str(TINY)
    # the tokenizer defaults to the target's, byte for byte
    assert (out / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()
    # from random weights, 40 steps of KL to the target move the draft towards it: the KL falls and both
    # measures of agreement (computed on held-out windows, apart from the loss) rise
    first, last = log["train_loss"][:5], log["train_loss"][-5:]
    assert sum(last) / 5 < 0.8 * sum(first) / 5
    before, after = log["agreement_before"], log["agreement_after"]
    assert after["expected_acceptance_t1"] > before["expected_acceptance_t1"] + 0.05
    assert after["top1_agreement"] > before["top1_agreement"]
    assert "Distilled" in (out / "README.md").read_text()


def test_init_from_starts_at_the_given_weights(script, small_corpus, tmp_path):
    out = tmp_path / "draft"
    rc = script.main(["--size", "draft", "--out", str(out), "--distil-from", str(TINY), "--init-from", str(DRAFT),
                      "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--eval-windows", "2"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    # the bundled draft already agrees with memfit-tiny far above a random draft (~1/V top-1)
    assert log["agreement_before"]["top1_agreement"] > 0.2


def test_distil_refuses_a_target_with_another_tokenizer(script, small_corpus, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in TINY.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    (other / "tokenizer.json").write_text((TINY / "tokenizer.json").read_text().replace("}", "} ", 1))
    rc = script.main(["--size", "draft", "--out", str(tmp_path / "d"), "--distil-from", str(other),
                      "--tokenizer", str(TINY), "--steps", "1", "--seq-len", "32"])
    assert rc == 2
    assert not (tmp_path / "d" / "model.safetensors").exists()
