"""`memfit fit`: the predicted breakdown, checked against the memory the engine really takes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from memfit.cli import main as memfit_main
from memfit.llm.engine.fit import kv_cache_bytes, predict
from memfit.llm.models.config import ModelConfig
from memfit.llm.models.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[3]


def write_model(path: Path, **shape) -> Path:
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=1024,
              rms_norm_eps=1e-6, torch_dtype="float32", **shape)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    big = write_model(root / "big", hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, vocab_size=32000)
    warm = write_model(root / "warm", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=512)
    return big, warm


def _probe(models_dir, prepack: int, cpu_linear: str) -> dict:
    big, warm = models_dir
    out = subprocess.run(
        [sys.executable, "-m", "tests.llm.engine.fit_probe", str(big), str(warm), "--batch", "4", "--context", "512",
         "--prepack", str(prepack), "--cpu-linear", cpu_linear], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# (1, "auto") is the engine's default: memfit's blocked kernel on packed weights. The probe serves two rounds
# of requests (see fit_probe.py: a first round alone peaks before the mapped embedding table is resident).
@pytest.mark.parametrize("prepack,cpu_linear", [(1, "auto"), (0, "auto"), (1, "onednn")])
def test_prediction_within_10_percent_of_measured_peak(models_dir, prepack, cpu_linear):
    r = _probe(models_dir, prepack, cpu_linear)
    ratio = r["measured_bytes"] / r["predicted_bytes"]
    assert 0.9 <= ratio <= 1.1, r


def test_kv_formula_and_page_rounding():
    cfg = ModelConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, hidden_size=64, num_attention_heads=4,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    # one token of K in one layer: 2 heads x 16 x 4 bytes = 128 B; 32 tokens fill one 4 KiB page exactly
    assert kv_cache_bytes(cfg, torch.float32, 32, 1) == 2 * 2 * 4096
    assert kv_cache_bytes(cfg, torch.float32, 33, 3) == 3 * 2 * 2 * 8192
    assert cfg.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_fit_command_reports_and_exit_code(models_dir, capsys):
    big, _ = models_dir
    assert memfit_main(["fit", "--model", str(big), "--context", "512", "--batch", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    b = predict(ModelConfig.from_dir(big), torch.float32, 512, 4)
    assert r["total_bytes"] == b.total_bytes and r["fits"] is True
    assert memfit_main(["fit", "--model", str(big), "--context", "512", "--batch", "4", "--memory", "10MiB"]) == 3
    assert "does NOT fit" in capsys.readouterr().out
    assert memfit_main(["fit", "--model", str(big / "nope")]) == 2
    assert "error" in capsys.readouterr().err


def test_bf16_decode_workspace_is_kept_and_within_the_prediction(tmp_path):
    """A bf16 decode batch past the small-attention size copies K/V into the runner's workspace; `fit`
    predicts that workspace, and the engine reports what it holds."""
    from memfit.llm.engine.llm_engine import LLMEngine
    from memfit.llm.engine.fit import predict
    from memfit.llm.models.config import ModelConfig
    from memfit.llm.engine.params import SamplingParams
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, dtype="bfloat16")
    eng = LLMEngine(model=str(path), kv_budget="64MiB", max_num_seqs=12, max_num_batched_tokens=2048, device="cpu")
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i in range(12):
        eng.add_request(prompt_token_ids=[(7 * i + j) % 250 + 3 for j in range(150)], params=params)
    while eng.has_unfinished_requests():
        eng.step()
    held = eng.stats()["workspace_bytes"]
    cfg = ModelConfig.from_dir(path)
    ws = predict(cfg, torch.bfloat16, context_len=160 + 64, batch=12).workspace_bytes  # contexts pad to 64
    rope = 2 * cfg.max_position_embeddings * cfg.head_dim * 2
    assert held > 0 and held <= ws - rope
    assert predict(cfg, torch.float32, 160, 12).workspace_bytes == 2 * cfg.max_position_embeddings * cfg.head_dim * 4
