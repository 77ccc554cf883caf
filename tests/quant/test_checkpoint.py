"""memfit.quant.checkpoint with timm's hub layout: a config.json that does not describe the weights beside it is a
QuantError naming the file and what differs, not torch's RuntimeError or json's bare message."""
from __future__ import annotations

import json

import pytest

from memfit.cli import main
from memfit.quant.checkpoint import load_checkpoint
from memfit.quant.errors import QuantError
from memfit.quant.models import default_spec


@pytest.fixture
def hub(tmp_path):
    """A tiny ViT's weights as timm's model.safetensors (no memfit metadata): its config.json is what is read."""
    from safetensors.torch import save_file

    spec = default_spec("vit", tiny=True)
    model = spec.build()  # untrained: only the tensors' shapes matter here
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_a_config_naming_a_wider_model_names_the_files_and_the_shapes(hub):
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    with pytest.raises(QuantError) as info:
        load_checkpoint(hub / "model.safetensors")
    msg = str(info.value)
    assert str(hub / "model.safetensors") in msg and str(hub / "config.json") in msg
    assert "differ in shape" in msg and "in the file" in msg and "in the model" in msg


@pytest.mark.parametrize("config, words", [("not json {", "is not readable JSON"), ("[1, 2]", "a JSON object"),
                                           ('{"architecture": "vit_tiny_patch16_224", "model_args": 3}',
                                            "a JSON object")])
def test_a_config_that_is_not_a_config_names_the_file(hub, config, words):
    (hub / "config.json").write_text(config)
    with pytest.raises(QuantError, match=words) as info:
        load_checkpoint(hub / "model.safetensors")
    assert str(hub / "config.json") in str(info.value)


def test_model_args_the_model_does_not_take_are_a_quant_error(hub):
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                 "model_args": {"no_such_arg": 1}}))
    with pytest.raises(QuantError, match="no_such_arg"):
        load_checkpoint(hub / "model.safetensors")


def test_quant_vit_refuses_the_mismatch_in_one_line(hub, capsys):
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    assert main(["quant", "vit", "--model", str(hub / "model.safetensors"), "--json", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "differ in shape" in json.loads(out)["error"] and "Traceback" not in err


def test_quant_vit_with_a_directory_says_it_is_one_and_names_the_file_to_give(hub, capsys):
    """--model DIR (timm's hub folder) was refused as 'checkpoint DIR not found'."""
    assert main(["quant", "vit", "--model", str(hub), "--json", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    msg = json.loads(out)["error"]
    assert f"checkpoint {hub} is a directory" in msg and "not found" not in msg and "Traceback" not in err
    assert f"a .safetensors file is needed, e.g. {hub / 'model.safetensors'}" in msg


def test_a_directory_is_refused_without_naming_an_option(hub, tmp_path_factory):
    """read_spec serves `quant vit --model` and `quant train-vit --teacher` alike: the message said '--model takes
    a .safetensors file', wrong for --teacher DIR. It names the file to give where the folder holds one."""
    from memfit.quant.checkpoint import read_spec

    with pytest.raises(QuantError) as info:
        read_spec(hub)
    msg = str(info.value)
    assert "--model" not in msg and "--teacher" not in msg and "a .safetensors file is needed, e.g." in msg
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(QuantError, match=r"is a directory; a \.safetensors file is needed \(as `memfit quant"):
        read_spec(empty)
