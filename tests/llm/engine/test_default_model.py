"""The bundled default model and its draft (memfit/assets/models/): complete, loadable, and actually trained."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.models.config import ModelConfig
from memfit.llm.models.llama import LlamaForCausalLM

safetensors_torch = pytest.importorskip("safetensors.torch")
tokenizers = pytest.importorskip("tokenizers")

MODELS = Path(__file__).resolve().parents[3] / "memfit" / "assets" / "models"
DEFAULT, DRAFT = MODELS / "memfit-tiny", MODELS / "memfit-tiny-draft"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md", "train_log.json", "loss.png")

# Written for this test, so it is in neither the training nor the validation files.
HELD_OUT = '''def moving_average(values, window=3):
    """Return the running mean of values over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        result.append(total / min(i + 1, window))
    return result


class Counter:
    def __init__(self, start=0):
        self.count = start

    def increment(self, step=1):
        self.count += step
        return self.count
'''


def load(model_dir: Path) -> tuple[ModelConfig, LlamaForCausalLM]:
    cfg = ModelConfig.from_dir(model_dir)
    model = LlamaForCausalLM(cfg)
    state = {k: v.float() for k, v in safetensors_torch.load_file(str(model_dir / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    return cfg, model.eval()


@pytest.mark.parametrize("model_dir", [DEFAULT, DRAFT], ids=["default", "draft"])
def test_model_dir_is_complete_and_loads(model_dir: Path) -> None:
    for name in REQUIRED:
        assert (model_dir / name).is_file(), f"{model_dir.name} lacks {name}"
    cfg = ModelConfig.from_dir(model_dir)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["torch_dtype"] == "bfloat16"

    expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    expected.pop("lm_head.weight")  # tied: stored once, as model.embed_tokens.weight
    with safetensors_torch.safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert stored == expected
    assert (model_dir / "model.safetensors").stat().st_size <= 20 * 1024 * 1024


def test_tokenizer_round_trips_and_is_shared() -> None:
    assert (DRAFT / "tokenizer.json").read_bytes() == (DEFAULT / "tokenizer.json").read_bytes()
    tok = tokenizers.Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))
    cfg = ModelConfig.from_dir(DEFAULT)
    assert tok.get_vocab_size() == cfg.vocab_size
    snippet = HELD_OUT + "\n# unicode survives too: naïve café — 数据 🐍\n\tx = {'a': [1, 2.5e-3]}\r\n"
    ids = tok.encode(snippet).ids
    assert tok.decode(ids, skip_special_tokens=False) == snippet
    assert len(ids) < len(snippet) / 2  # BPE merges actually compress Python source
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == tok.token_to_id("<|im_start|>")
    assert cfg.eos_token_id == [eot, im_end]
    gen = json.loads((DEFAULT / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eot, im_end]


def test_chat_template_renders_chatml() -> None:
    jinja2 = pytest.importorskip("jinja2")
    tok_cfg = json.loads((DEFAULT / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|endoftext|>" and tok_cfg["bos_token"] is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = jinja2.Environment().from_string(tok_cfg["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def test_models_predict_held_out_python_far_better_than_uniform() -> None:
    tok = tokenizers.Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))
    ids = torch.tensor([tok.encode(HELD_OUT).ids])  # (1, T)
    losses = {}
    for name, model_dir in (("default", DEFAULT), ("draft", DRAFT)):
        cfg, model = load(model_dir)
        logits = model.dense_logits(ids[:, :-1])  # (1, T-1, V)
        losses[name] = F.cross_entropy(logits[0], ids[0, 1:]).item()
        assert losses[name] < 0.5 * math.log(cfg.vocab_size), (name, losses[name])
    # The draft is much smaller, so it should not beat the model it drafts for.
    assert losses["default"] < losses["draft"], losses
    cfg_default, cfg_draft = ModelConfig.from_dir(DEFAULT), ModelConfig.from_dir(DRAFT)
    assert cfg_draft.num_parameters() * 2 < cfg_default.num_parameters()


def test_bundled_model_generates_offline_through_the_engine() -> None:
    """What `scripts/demo` does: the engine resolves the bundled name and writes code-shaped text."""
    from memfit.llm.engine.api import LLM
    from memfit.llm.engine.params import SamplingParams

    llm = LLM("memfit-tiny", kv_budget="16MiB")
    out = llm.generate("def add(a, b):\n", SamplingParams(max_tokens=24, temperature=0))[0]
    assert len(out.token_ids) >= 1 and out.text.strip()
    assert out.finish_reason in ("stop", "length")
    # Greedy decoding is deterministic: the same call gives the same text.
    again = llm.generate("def add(a, b):\n", SamplingParams(max_tokens=24, temperature=0))[0]
    assert again.token_ids == out.token_ids
