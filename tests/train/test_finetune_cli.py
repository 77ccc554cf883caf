"""`memfit train finetune --device`: a device that is not there is one line and exit 2, not torch's traceback."""
from __future__ import annotations

import pytest
import torch

from memfit.cli import main as memfit_main


@pytest.mark.parametrize("device, words", [("cuda", "no CUDA device is usable here"),
                                           ("cuda:1", "no CUDA device is usable here"),
                                           ("tpu", "auto, cpu, cuda or cuda:N")])
def test_finetune_refuses_a_missing_or_unknown_device(device, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    rc = memfit_main(["train", "finetune", "--model", "memfit-tiny", "--data", str(data), "--steps", "1",
                      "--device", device, "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_refused_finetune_with_json_prints_one_error_object(tmp_path, capsys):
    """With --json a refusal is also the one JSON object on stdout ({"error": ...}), as the other commands print."""
    import json

    rc = memfit_main(["train", "finetune", "--model", "memfit-tiny", "--data", str(tmp_path / "nope.jsonl"),
                      "--steps", "1", "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 2
    body = json.loads(out)
    assert set(body) == {"error"} and body["error"] and body["error"] in err and "Traceback" not in err
