import json
import subprocess
import sys

import pytest
import torch

from memfit.quant.checkpoint import load_checkpoint, read_spec, save_checkpoint
from memfit.quant.errors import QuantError, UnknownArchitectureError
from memfit.quant.models import ModelSpec, default_spec
from memfit.quant.train import TrainViTConfig, evaluate


@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_tiny_models_learn(tiny_models, fmnist_small, arch):
    model, spec, result = tiny_models[arch]
    assert spec.arch == arch
    assert result.steps == (40 if arch == "swin" else 80)
    assert result.losses[-1] < result.losses[0]  # loss went down
    # 10 classes: chance is ~10%. A few dozen steps on 2k images already separate the easy classes
    # (Swin, with 196 tokens at width 16 and half the steps, more slowly).
    assert evaluate(model, fmnist_small.x_test, fmnist_small.y_test) > (0.2 if arch == "swin" else 0.35)


def test_deit_has_distillation_token_and_swin_window_divides_grid():
    deit = default_spec("deit").build()
    assert deit.dist_token is not None and deit.head_dist is not None
    assert deit.num_prefix_tokens == 2  # [CLS] + distillation token
    swin = default_spec("swin").build()
    grid = swin.patch_embed.grid_size
    for stage in swin.layers:
        for block in stage.blocks:
            ws = block.window_size
            h, w = block.input_resolution
            assert h % ws[0] == 0 and w % ws[1] == 0
    assert grid == (14, 14)


@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_checkpoint_round_trip(tiny_models, tmp_path, arch):
    model, spec, _ = tiny_models[arch]
    path = save_checkpoint(tmp_path / f"{arch}.safetensors", model, spec, {"note": "x"})
    loaded, spec2, info = load_checkpoint(path)
    assert spec2.timm_name == spec.timm_name and spec2.kwargs == json.loads(json.dumps(spec.kwargs))
    assert info == {"note": "x"}
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_timm_hub_layout_checkpoint(tiny_models, tmp_path):
    """A model.safetensors with timm's config.json beside it (no memfit metadata) loads too."""
    from safetensors.torch import save_file

    model, spec, _ = tiny_models["vit"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    kwargs = dict(spec.kwargs)
    num_classes = kwargs.pop("num_classes")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": spec.timm_name, "num_classes": num_classes, "model_args": kwargs}))
    loaded, spec2, _ = load_checkpoint(tmp_path / "model.safetensors")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="train-vit"):
        read_spec(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(QuantError, match="config.json"):
        read_spec(tmp_path / "bare.safetensors")
    with pytest.raises(UnknownArchitectureError, match="supports"):
        ModelSpec("resnet18", {}).build()
    with pytest.raises(UnknownArchitectureError, match="vit, deit, swin"):
        default_spec("convnext")
    with pytest.raises(QuantError, match="teacher"):
        TrainViTConfig(arch="vit", teacher="x.safetensors").validate()


def test_a_truncated_checkpoint_is_a_quant_error_not_a_traceback(tmp_path):
    spec = default_spec("vit", tiny=True)
    whole = tmp_path / "whole.safetensors"
    save_checkpoint(whole, spec.build(), spec)  # untrained weights: only the file's shape matters here
    data = whole.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])  # the header reads, the tensors do not
    (tmp_path / "head.safetensors").write_bytes(data[:20])  # not even the header
    for name in ("half.safetensors", "head.safetensors"):
        with pytest.raises(QuantError, match="not a readable safetensors file"):
            load_checkpoint(tmp_path / name)


def test_cli_train_vit_json(tmp_path):
    out = tmp_path / "m.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "quant", "train-vit", "--arch", "vit", "--tiny", "--max-train", "256",
         "--max-steps", "4", "--batch-size", "64", "--out", str(out), "--json", "--no-progress", "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["steps"] == 4 and out.is_file()
    assert (tmp_path / "m.loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "m.loss.json").read_text())["losses"] == result["losses"]
    bad = subprocess.run([sys.executable, "-m", "memfit.cli", "quant", "train-vit", "--arch", "resnet"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "vit, deit, swin" in bad.stderr and bad.stdout == ""
