"""memfit.llm.models.loader: HF model dirs in, clear errors for everything it cannot or will not load."""
from __future__ import annotations

import gc
import json
import re
import shutil
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from memfit.llm.models import loader
from memfit.llm.models.loader import ModelNotFoundError, load_model, resolve_model_path
from memfit.llm.models import ModelFormatError

pytest.importorskip("transformers")
from tests.llm.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_model_dir(root, family=fam) for fam in ("llama", "qwen2")}


@pytest.fixture
def llama_dir(built, tmp_path) -> Path:
    """A private copy of the tiny Llama dir that a test may break."""
    return Path(shutil.copytree(built["llama"], tmp_path / "llama"))


@pytest.fixture
def qwen_dir(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["qwen2"], tmp_path / "qwen2"))


def _rewrite_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    sd = dict(load_file(str(file)))
    edit(sd)
    file.unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))


def _file_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges where `file` is memory-mapped into this process (Linux /proc/self/maps)."""
    ranges = []
    target = str(file.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


# --- loading what it should -------------------------------------------------------------------------------


def test_loads_config_and_all_weights(llama_dir):
    model, cfg = load_model(llama_dir)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.torch_dtype == "float32"
    assert cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3"
    assert not any(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert not model.training
    ref = load_file(str(llama_dir / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_tied_embeddings_share_one_parameter(qwen_dir):
    model, cfg = load_model(qwen_dir)
    assert cfg.tie_word_embeddings and cfg.qkv_bias
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(str(qwen_dir / "model.safetensors"))  # transformers omits it
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_tied_checkpoint_that_keeps_lm_head_still_loads(qwen_dir):
    _rewrite_weights(qwen_dir, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()))
    model, _ = load_model(qwen_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_known_buffers_in_checkpoint_are_ignored(llama_dir):
    _rewrite_weights(llama_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    load_model(llama_dir)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_same_dtype_load_maps_the_file_instead_of_copying(llama_dir):
    model, _ = load_model(llama_dir)
    ranges = _file_ranges(llama_dir / "model.safetensors")
    assert ranges, "the safetensors file is not memory-mapped"
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), f"{name} is a copy, not a view of the file"
    # The check can fail: a converting load must copy, and then no parameter lies in a mapping.
    del model
    gc.collect()
    half, _ = load_model(llama_dir, dtype="bfloat16")
    ranges = _file_ranges(llama_dir / "model.safetensors")
    assert not any(lo <= p.data_ptr() < hi for p in half.parameters() for lo, hi in ranges)


def test_loading_does_not_grow_rss_by_the_weights(tmp_path):
    """A 64 MiB checkpoint: a loader that copied it would grow RSS by >= 64 MiB; mmap grows it by ~0."""
    vocab, hidden = 16384, 512
    cfg = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    head_dim = hidden // 4
    sd = {
        "model.embed_tokens.weight": torch.zeros(vocab, hidden),
        "lm_head.weight": torch.zeros(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(4 * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": torch.zeros(4 * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": torch.zeros(4 * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(hidden, 4 * head_dim),
        "model.layers.0.mlp.gate_proj.weight": torch.zeros(64, hidden),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(64, hidden),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(hidden, 64),
    }
    save_file(sd, str(tmp_path / "model.safetensors"))
    weight_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    model, _ = load_model(tmp_path)
    grown = proc.memory_info().rss - before
    assert weight_bytes > 64 * 2**20
    assert grown < 0.25 * weight_bytes, f"RSS grew {grown / 2**20:.1f} MiB loading {weight_bytes / 2**20:.1f} MiB"
    # The weights are really there: a forward pass reads them (pages come in from the file now).
    with torch.no_grad():
        assert model.dense_logits(torch.tensor([[1, 2, 3]])).shape == (1, 3, vocab)


def test_dtype_argument_and_checkpoint_dtype(built, tmp_path):
    model, cfg = load_model(built["llama"], dtype="fp16")
    assert cfg.torch_dtype == "float16" and model.lm_head.weight.dtype == torch.float16
    bf = make_tiny_model_dir(tmp_path, family="mistral", dtype="bfloat16")
    model, cfg = load_model(bf)
    assert cfg.torch_dtype == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(built["llama"], dtype="int8")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda_matches_cpu(built):
    cpu, _ = load_model(built["llama"])
    gpu, _ = load_model(built["llama"], device="cuda")
    assert all(p.is_cuda for p in gpu.parameters())
    ids = torch.randint(0, cpu.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gpu.dense_logits(ids.cuda()).cpu(), cpu.dense_logits(ids), atol=1e-3, rtol=0)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    path = make_tiny_model_dir(tmp_path, family="qwen2", sharded=True)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelFormatError, match=shards[-1].name):
        load_model(path)


# --- refusing what it should, clearly -----------------------------------------------------------------------


def test_pickle_only_checkpoint_is_refused(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelFormatError, match="only safetensors") as err:
        load_model(llama_dir)
    assert "pytorch_model.bin" in str(err.value) and "safe_serialization=True" in str(err.value)


def test_pickle_is_ignored_when_safetensors_exist(llama_dir):
    (llama_dir / "pytorch_model.bin").write_bytes(b"never opened")
    load_model(llama_dir)


def test_dir_without_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no .*safetensors"):
        load_model(llama_dir)


def test_unknown_architecture_is_refused(tmp_path):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        load_model(tmp_path)


def test_unsupported_activation_and_dtype_in_config(llama_dir):
    cfg_file = llama_dir / "config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "dtype": "float64"}))
    with pytest.raises(ModelFormatError, match="float64.*pass dtype="):
        load_model(llama_dir)
    assert load_model(llama_dir, dtype="float32")[1].torch_dtype == "float32"
    cfg_file.write_text(json.dumps({**raw, "hidden_act": "gelu"}))
    with pytest.raises(ModelFormatError, match="hidden_act 'gelu'"):
        load_model(llama_dir)


def test_missing_and_malformed_config(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(llama_dir)
    (llama_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json not found"):
        load_model(llama_dir)


@pytest.mark.parametrize("field, value, words", [
    ("architectures", -1, "architectures must be a list of class names"),
    ("architectures", [7], "architectures must be a list of class names"),
    ("rope_scaling", "x", "rope_scaling must be an object"),
    ("eos_token_id", 1.5, "eos_token_id must be a token id"),
    ("eos_token_id", [2, True], "eos_token_id must be a token id"),
    ("bos_token_id", "1", "bos_token_id must be a token id"),
    ("num_hidden_layers", 1e12, "num_hidden_layers must be a positive integer"),
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer"),
    ("num_hidden_layers", 10**12, "num_hidden_layers must be at most 4096"),
    ("hidden_size", 2.0, "hidden_size must be a positive integer"),
    ("vocab_size", 1 << 40, "vocab_size must be at most"),
    ("head_dim", "32", "head_dim must be a positive integer"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a non-negative number"),
    ("sliding_window", 4.5, "sliding_window must be a non-negative integer"),
    ("torch_dtype", 16, "torch_dtype must be a string"),
])
def test_wrong_field_types_in_config_are_named(llama_dir, field, value, words):
    """A wrong JSON type was a TypeError or AttributeError traceback (architectures -1, rope_scaling "x",
    eos_token_id 1.5), and 10**12 layers a MemoryError while shapes were listed: the field, what it holds and
    what it should hold are said instead."""
    from memfit.llm.models import ModelConfig

    raw = json.loads((llama_dir / "config.json").read_text())
    with pytest.raises(ModelFormatError, match=f"config field {words}.*got {re.escape(repr(value))}$"):
        ModelConfig.from_hf_dict({**raw, field: value})
    (llama_dir / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(ModelFormatError, match=f"config field {words}"):
        load_model(llama_dir)


def test_qwen2_layer_count_is_bounded_before_its_window_layers_are_listed(built):
    # _sliding_window listed a kind per layer: 10**12 layers ran out of memory before any size check
    from memfit.llm.models import ModelConfig

    raw = json.loads((built["qwen2"] / "config.json").read_text())
    raw.update(use_sliding_window=True, sliding_window=64, num_hidden_layers=10**12)
    with pytest.raises(ModelFormatError, match="num_hidden_layers must be at most"):
        ModelConfig.from_hf_dict(raw)


def test_check_weight_files_refuses_what_the_loader_refuses(llama_dir):
    assert loader.check_weight_files(llama_dir) == [llama_dir / "model.safetensors"]
    with open(llama_dir / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelFormatError, match="not a readable safetensors file"):
        loader.check_weight_files(llama_dir)
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no .*safetensors"):
        loader.check_weight_files(llama_dir)


def test_wrong_shape_names_the_tensor_and_both_shapes(llama_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(llama_dir, lambda sd: sd.__setitem__(name, torch.zeros(16, 64)))  # expects (32, 64)
    with pytest.raises(ModelFormatError, match=r"k_proj.weight.*\[16, 64\].*\[32, 64\]"):
        load_model(llama_dir)


def test_missing_weight_is_named(llama_dir):
    _rewrite_weights(llama_dir, lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ModelFormatError, match=r"lacks weight.*model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(llama_dir)


def test_unexpected_weight_is_named(llama_dir):
    _rewrite_weights(llama_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(16)))
    with pytest.raises(ModelFormatError, match="q_norm.weight"):
        load_model(llama_dir)


def test_corrupt_safetensors_file(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="not a readable safetensors"):
        load_model(llama_dir)


# --- resolving names ------------------------------------------------------------------------------------------


def test_resolve_local_dir_and_refuse_anything_else(built, tmp_path):
    assert resolve_model_path(str(built["llama"])) == built["llama"].resolve()
    with pytest.raises(ModelNotFoundError, match="local model directories only"):
        resolve_model_path("meta-llama/Llama-3.2-1B")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for callers that catch that
        resolve_model_path(tmp_path / "nope")
    file = tmp_path / "f.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(file)


def test_resolve_bundled_names(built, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "ASSETS_DIR", tmp_path / "assets")
    with pytest.raises(ModelNotFoundError, match="bundled model 'memfit-tiny' is missing"):
        resolve_model_path("memfit-tiny")
    shutil.copytree(built["llama"], tmp_path / "assets" / "memfit-tiny-draft")
    assert resolve_model_path("memfit-tiny-draft") == tmp_path / "assets" / "memfit-tiny-draft"
    _, cfg = load_model("memfit-tiny-draft")
    assert cfg.num_hidden_layers == 2


def test_bundled_assets_dir_is_inside_the_package():
    import memfit

    assert loader.ASSETS_DIR == Path(memfit.__file__).resolve().parent / "assets" / "models"
