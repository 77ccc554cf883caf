"""Every command refuses a user's mistake with one prefix, the one argparse gives its own refusals of that command
('memfit quant vit: error: ...'): plan and train printed a bare 'error: ...', the others 'memfit X: error: ...'."""
from __future__ import annotations

import json

import pytest

from memfit.cli import main


def _argparse_prefix(argv: list[str], capsys) -> str:
    """What argparse itself puts before a refusal of this command (an option it does not know)."""
    with pytest.raises(SystemExit):
        main([*argv, "--no-such-option-xyz"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    return last[:last.index(": error: ") + len(": error: ")]


@pytest.mark.parametrize("argv, words", [
    (["plan", "--model", "no_such_net_xyz"], "unknown model"),
    (["plan", "validate"], "usage"),
    (["train", "local", "--method", "bogus", "--no-progress"], "unknown method"),
    (["train", "finetune", "--model", "memfit-tiny", "--data", "chats.jsonl", "--threads", "0", "--no-progress"],
     "--threads"),
    (["quant", "vit", "--model", "missing.safetensors", "--act-bits", "5", "--no-progress"], "--act-bits"),
    (["costmodel", "generate", "--n", "0", "--out", "k.db"], "--n must be at least 1"),
    (["costmodel", "predict", "missing.mlir"], "missing.mlir"),
    (["fit", "--context", "0"], "context"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_every_commands_refusal_has_argparses_prefix(argv, words, as_json, tmp_path, capsys, monkeypatch):
    if as_json and argv[:2] == ["costmodel", "generate"]:
        pytest.skip("costmodel generate has no --json")
    monkeypatch.chdir(tmp_path)
    prefix = _argparse_prefix(argv, capsys)
    assert prefix.startswith("memfit ")
    assert main([*argv, *(["--json"] if as_json else [])]) == 2
    out, err = capsys.readouterr()
    line = next(l for l in err.splitlines() if ": error: " in l)
    assert line.startswith(prefix) and words in line and "Traceback" not in err, (prefix, err)
    assert (json.loads(out)["error"] in err) if as_json else out == ""
