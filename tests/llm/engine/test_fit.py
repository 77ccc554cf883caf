"""`memfit fit`: the predicted breakdown, checked against the memory a fresh process really adds."""
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
from memfit.llm.engine import accounting
from memfit.llm.engine.fit import kv_cache_bytes, predict
from memfit.llm.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[3]

# The shapes a new user tries (benchmarks/decode_setup.py's 0.1b and 0.5b), random-initialised in bf16.
SHAPES = {
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def write_random_llama(path: Path, dtype: str = "bfloat16", **shape) -> Path:
    """A random checkpoint written tensor by tensor (no model object: 0.5B in bf16 is 1 GB)."""
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=2048,
              rms_norm_eps=1e-6, torch_dtype=dtype, **shape)
    hf["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf))
    cfg = ModelConfig.from_hf_dict(hf)
    from memfit.llm.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in skeleton.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = (torch.randn(p.shape, generator=g) * 0.02).to(getattr(torch, dtype))
    save_file(tensors, str(path / "model.safetensors"))
    Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """Written by another process: 3 GB of temporary tensors freed here would stay in this process's malloc
    arenas, and later tests that watch this process's RSS grow would see none."""
    root = tmp_path_factory.mktemp("fit")
    code = ("import sys; from pathlib import Path; from tests.llm.engine.test_fit import SHAPES, write_random_llama; "
            "[write_random_llama(Path(sys.argv[1]) / n, **s) for n, s in SHAPES.items()]")
    subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, check=True, timeout=600)
    return {name: root / name for name in SHAPES}


def _probe(model: str, batch: int, context: int, cpu_linear: str = "auto", *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "memfit.llm.engine.fitcheck", model, "--batch", str(batch), "--context", str(context),
         "--cpu-linear", cpu_linear, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


RUNTIME_NOISE = 3 * 2**20  # how far one process's runtime share may fall below another's (see _check)


def _check(r: dict) -> None:
    summary = {k: r[k] >> 10 for k in ("total_bytes", "measured_end_bytes", "measured_peak_bytes", "runtime_bytes",
                                        "weights_bytes", "kv_bytes", "activation_bytes", "load_peak_bytes")}
    # The ledger's total is what the process may hold at its peak: the peak is within 10% of it. After the
    # workload the engine has released idle KV pages (reclaim_idle), so the end may sit lower, never higher.
    # Below ~30 MiB the bound is 3 MiB instead: the same calibration workload, repeated in fresh processes,
    # held 15.0-20.3 MiB beside its KV (18.0-18.3 with address-space randomisation off: where the heap and
    # the mappings land decides what the allocator keeps), noise no formula can predict.
    # The runtime counted is the most of the calibration's fresh runs (a budget wants the top of that noise), so
    # a run may hold less by as much as one process's runtime share differs from another's: the calibration's
    # own draws spread (runtime_low_bytes is the least they held), but five draws can all land close together
    # while the run measured here lands low: on a Sapphire-Rapids-class host, five draws of bf16 memfit-tiny at
    # batch 8 spread 6.83-7.26 MiB and three more 5.69-7.98 (calibrate.py cites 6.4-9.6 MB on another machine).
    # So the lower bound allows the larger of the draws' spread and RUNTIME_NOISE; the upper bound (the ledger
    # covers the peak) allows no such thing.
    total = r["total_bytes"]
    slack = max(0.10 * total, 3 * 2**20)
    spread = r["runtime_bytes"] - r["runtime_low_bytes"]
    peak, end = r["measured_peak_bytes"], r["measured_end_bytes"]
    assert 0 <= spread <= max(0.5 * r["runtime_bytes"], slack), summary  # the draws agree: the bound stays tight
    low = total - slack - max(spread, RUNTIME_NOISE)
    assert low <= peak <= total + slack, ("peak", round(peak / total, 3), "KiB:", summary)
    assert end <= total + slack, ("end", round(end / total, 3), "KiB:", summary)
    assert r["runtime_baseline_bytes"] > 0 and r["runtime_bytes"] > 0  # measured, and reported apart


def test_the_band_refuses_a_prediction_far_above_the_peak():
    """_check's lower bound allows the slack and the runtime share's noise, not more: at memfit-tiny's size (a
    24 MiB peak, its calibration's spread) that is 3 + 3 MiB, so a prediction 8% above the peak passes and 30%
    above fails (25% is where the band ends at this size: a small model's band is that wide, a 0.1B's 10% + 3
    MiB); one under the peak by more than the slack fails the upper bound."""
    MiB = 2**20
    base = {"measured_end_bytes": 20 * MiB, "runtime_bytes": 7 * MiB, "runtime_low_bytes": int(6.6 * MiB),
            "runtime_baseline_bytes": 600 * MiB, "weights_bytes": 8 * MiB, "kv_bytes": 3 * MiB,
            "activation_bytes": 2 * MiB, "load_peak_bytes": 18 * MiB}
    peak = 24 * MiB
    _check({**base, "measured_peak_bytes": peak, "total_bytes": int(1.08 * peak)})
    with pytest.raises(AssertionError, match="peak"):
        _check({**base, "measured_peak_bytes": peak, "total_bytes": int(1.3 * peak)})
    with pytest.raises(AssertionError, match="peak"):
        _check({**base, "measured_peak_bytes": peak, "total_bytes": peak - 4 * MiB})


@pytest.mark.slow
def test_prediction_within_10_percent_on_the_bundled_model():
    _check(_probe("memfit-tiny", batch=8, context=192))


@pytest.mark.slow
def test_prediction_holds_for_weights_converted_at_load():
    """memfit-tiny is stored in bf16: in float32 every weight is a converted copy on the C heap until it is packed.
    Freed without a trim those pages stayed resident, and the load alone peaked 3-8 MiB above the prediction
    (blocked_model.use_blocked_linears)."""
    _check(_probe("memfit-tiny", 1, 512, "auto", "--dtype", "float32"))


@pytest.mark.slow
@pytest.mark.parametrize("draft,gamma,batch,context", [("memfit-tiny-draft", 4, 8, 192), ("memfit-tiny-draft", 6, 4, 512),
                                                       ("self", 4, 8, 192)])
def test_prediction_within_10_percent_with_speculative_decoding(draft, gamma, batch, context):
    r = _probe("memfit-tiny", batch, context, "auto", "--speculative-model", draft, "--num-speculative-tokens", str(gamma))
    _check(r)
    assert r["speculative_bytes"] > 0 and (r["draft_weights_bytes"] == 0) == (draft == "self")


@pytest.mark.slow
@pytest.mark.parametrize("shape,batch,context,cpu_linear", [
    ("0.1b", 8, 192, "auto"),  # the case from the issue: predicted 266 MiB, measured 1.65x that
    ("0.1b", 1, 512, "onednn"),
    ("0.5b", 2, 64, "auto"),  # tied head: packed once, the lookups read the packed matrix
])
def test_prediction_within_10_percent_on_random_llamas(random_models, shape, batch, context, cpu_linear):
    _check(_probe(str(random_models[shape]), batch, context, cpu_linear))


def test_weights_formula_matches_what_the_loaded_model_holds(random_models):
    """`accounting.weights_bytes` (what fit predicts and the engine reserves) against the storages the prepared
    model really holds: packed arenas and the checkpoint's mapped tensors, each storage counted once."""
    from memfit.llm.kernels.backends import BackendOptions, prepare_model
    from memfit.llm.models.loader import load_model

    path = random_models["0.1b"]
    for linear in ("blocked", "onednn", "memfit"):
        model, cfg = load_model(path)
        chosen = prepare_model(model, BackendOptions(max_num_seqs=8, cpu_linear=linear), torch.device("cpu"))
        storages: dict[int, int] = {}
        for module in model.modules():
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            tensors += [t for t in vars(module).values() if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.is_mkldnn:
                    storages[id(t)] = t.numel() * t.element_size()  # oneDNN's opaque packed weight
                else:
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
        held = sum(storages.values())
        predicted = accounting.weights_bytes(cfg, torch.bfloat16, chosen.cpu_linear, "cpu")
        assert abs(predicted - held) <= 0.01 * held, (linear, predicted, held)
        del model, chosen, storages
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # give the packing's freed copies back (see the fixture)


def test_kv_formula_and_page_rounding():
    cfg = ModelConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, hidden_size=64, num_attention_heads=4,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    # one token of K in one layer: 2 heads x 16 x 4 bytes = 128 B; 32 tokens fill one 4 KiB page exactly
    assert kv_cache_bytes(cfg, torch.float32, 32, 1) == 2 * 2 * 4096
    assert kv_cache_bytes(cfg, torch.float32, 33, 3) == 3 * 2 * 2 * 8192
    assert cfg.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_fit_command_reports_and_exit_code(random_models, capsys):
    big = random_models["0.1b"]
    assert memfit_main(["fit", "--model", str(big), "--context", "512", "--batch", "4", "--json", "--no-runtime"]) == 0
    r = json.loads(capsys.readouterr().out)
    b = predict(ModelConfig.from_dir(big), torch.bfloat16, 512, 4, cpu_linear=r["cpu_linear"], model_dir=big,
                in_place=accounting.attention_in_place("cpu", torch.bfloat16, True))
    assert r["total_bytes"] == b.total_bytes and r["fits"] is True and r["runtime_bytes"] == 0
    assert memfit_main(["fit", "--model", str(big), "--context", "512", "--batch", "4", "--memory-budget", "10MiB",
                        "--no-runtime"]) == 3
    assert "does NOT fit" in capsys.readouterr().out
    assert memfit_main(["fit", "--model", str(big / "nope")]) == 2
    assert "error" in capsys.readouterr().err


def test_bf16_decode_workspace_is_kept_and_within_the_prediction(tmp_path):
    """A bf16 decode batch past the small-attention size copies K/V into the runner's workspace; `fit`
    predicts that workspace, and the engine reports what it holds."""
    from memfit.llm.engine.llm_engine import LLMEngine
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
    rope = 2 * min(cfg.max_position_embeddings, 160 + 64) * cfg.head_dim * 2  # the engine's tables: max_model_len
    assert held > 0 and held <= ws - rope
    assert predict(cfg, torch.float32, 160, 12).workspace_bytes == 2 * 160 * cfg.head_dim * 4  # RoPE for 160 positions


# ---- tensor parallelism: one rank's breakdown ------------------------------------------------------------------
def test_fit_per_rank_holds_what_a_rank_loads():
    """At tensor-parallel size 2 the breakdown is one rank's: its weights equal the bytes of the tensors a rank
    actually loads (plain linears: held as loaded), its KV is exactly half, and the CLI prints the split."""
    from memfit.llm.engine.fit import predict_for_engine
    from memfit.llm.parallel.shard import load_shard

    one = predict_for_engine("memfit-tiny", 1024, 8, dtype=torch.float32, prepack=False, measure_runtime=False)
    two = predict_for_engine("memfit-tiny", 1024, 8, dtype=torch.float32, prepack=False, measure_runtime=False,
                             tensor_parallel_size=2)
    assert two.tensor_parallel_size == 2 and two.kv_bytes * 2 == one.kv_bytes
    for rank in range(2):
        shard, _ = load_shard("memfit-tiny", "float32", "cpu", rank, 2)
        held = sum(t.untyped_storage().nbytes() for t in {p.data_ptr(): p for p in shard.parameters()}.values())
        assert two.weights_bytes == held
    assert 0 < two.replicated_weights_bytes < two.weights_bytes < one.weights_bytes
    assert two.to_dict()["all_ranks_bytes"] == 2 * two.total_bytes


def test_fit_cli_tensor_parallel(capsys):
    assert memfit_main(["fit", "--model", "memfit-tiny", "--no-runtime", "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2" in out and "1/2 of the KV heads" in out and "all 2 ranks" in out
    assert memfit_main(["fit", "--model", "memfit-tiny", "--no-runtime", "--tensor-parallel-size", "3"]) == 2
    assert "does not divide the model's num_attention_heads (8)" in capsys.readouterr().err


def test_fit_per_rank_with_a_draft_counts_it_on_rank_0_only():
    from memfit.llm.engine.fit import predict_for_engine

    kw = dict(dtype=torch.float32, prepack=False, measure_runtime=False, tensor_parallel_size=2)
    plain = predict_for_engine("memfit-tiny", 512, 2, **kw)
    spec = predict_for_engine("memfit-tiny", 512, 2, speculative_model="memfit-tiny-draft", **kw)
    assert spec.speculative_bytes > 0 and spec.kv_bytes > plain.kv_bytes  # + the target's lookahead
    assert spec.all_ranks_bytes == 2 * spec.total_bytes - spec.speculative_bytes
    with pytest.raises(ValueError, match="self-draft"):
        predict_for_engine("memfit-tiny", 512, 2, speculative_model="self:2", **kw)


@pytest.mark.slow
def test_prediction_within_10_percent_with_a_token_tree():
    """`fit --tree` against a real run of tree speculation (fitcheck: greedy requests, as tree mode takes)."""
    r = _probe("memfit-tiny", 8, 192, "auto", "--speculative-model", "memfit-tiny-draft", "--speculative-tree", "4,3")
    _check(r)
    assert r["speculative_bytes"] > 0


def test_fit_tree_counts_the_tree_buffers_and_lookahead(capsys):
    """`memfit fit --tree W,D`: the tree's buffers (accounting.tree_speculation_bytes) in place of the chain's, and
    W x D lookahead tokens of the target's KV (a chain of depth D holds D), the draft's KV (D - 1) x W more."""
    base = ["fit", "--context", "256", "--batch", "2", "--no-runtime", "--speculative-model", "memfit-tiny-draft",
            "--json"]
    assert memfit_main(base + ["--num-speculative-tokens", "3"]) == 0
    chain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert memfit_main(base + ["--tree", "4,3"]) == 0
    tree = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "speculative_bound" not in tree  # the bound's speed-up model is the chain's
    cfg = ModelConfig.from_dir(__import__("memfit.llm.models.loader", fromlist=["x"]).resolve_model_path("memfit-tiny"))
    draft = ModelConfig.from_dir(__import__("memfit.llm.models.loader", fromlist=["x"]).resolve_model_path(
        "memfit-tiny-draft"))
    dt = getattr(torch, cfg.torch_dtype)
    assert tree["speculation_bytes"] == accounting.tree_speculation_bytes(draft.vocab_size, 4, 3, 2, 256)
    assert tree["kv_bytes"] - chain["kv_bytes"] == kv_cache_bytes(cfg, dt, 256 + 12, 2) - kv_cache_bytes(cfg, dt, 259, 2)
    assert tree["draft_kv_bytes"] == kv_cache_bytes(draft, dt, 256 + 2 * 4, 2)
    assert memfit_main(["fit", "--no-runtime", "--tree", "0,3", "--speculative-model", "memfit-tiny-draft"]) != 0
    assert memfit_main(["fit", "--no-runtime", "--tree", "2,3"]) != 0  # no draft


@pytest.mark.skipif(torch.cuda.is_available(), reason="the offline step rule is a CPU default")
@pytest.mark.parametrize("batch,context", [(1, 2048), (2, 384), (1, 300)])
def test_fit_offline_predicts_the_step_the_offline_api_forms(batch, context, capsys):
    """`memfit fit --offline` sizes its step as `LLM(...)` does on a CPU (read from an engine the offline API builds,
    not from fit's own rule), and predicts what --chunk at that step does; --chunk and a memory budget keep their
    meaning."""
    from memfit.llm.engine.api import LLM

    base = ["fit", "--context", str(context), "--batch", str(batch), "--json", "--no-runtime"]
    llm = LLM(max_num_seqs=batch, max_model_len=context)
    try:
        step = llm.engine.config.max_num_batched_tokens
    finally:
        llm.engine.close()
    assert memfit_main(base + ["--offline"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert offline["chunk"] == step
    assert memfit_main(base + ["--chunk", str(step)]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == offline["total_bytes"]
    assert memfit_main(base) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["chunk"] == 512
    if step > 512:  # a larger step holds more activations
        assert offline["activation_bytes"] > served["activation_bytes"]
    assert memfit_main(base + ["--offline", "--chunk", "256"]) == 0
    assert json.loads(capsys.readouterr().out)["chunk"] == 256
    llm = LLM(max_num_seqs=batch, max_model_len=context, memory_budget="4GiB")
    try:  # under a budget the offline API keeps the engine's step
        budgeted = llm.engine.config.max_num_batched_tokens
    finally:
        llm.engine.close()
    assert memfit_main(base + ["--offline", "--memory-budget", "4GiB"]) in (0, 3)
    assert json.loads(capsys.readouterr().out)["chunk"] == budgeted == 512
