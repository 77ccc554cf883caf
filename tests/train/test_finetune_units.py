"""The meta-device skeleton: the engine's modules with every parameter's shape, at no resident cost (the
process's RSS, read by the kernel, in a fresh interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import torch
from memfit.llm.models import ModelConfig
from memfit.memory.measure import status_bytes
from memfit.train.finetune.units import make_groups, skeleton
before = status_bytes()["RssAnon"]
model = skeleton(ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, head_dim=64))
print(json.dumps({"grown": status_bytes()["RssAnon"] - before, "dynamo": "torch._dynamo" in sys.modules,
                  "meta": all(p.is_meta for p in model.parameters()),
                  "numel": sum(g.numel for g in make_groups(model))}))
"""


def test_skeleton_costs_no_resident_memory():
    """Built on the meta device with torch.nn.init skipped: torch's meta `normal_` would import torch._dynamo
    (about 150 MiB of RSS, measured 78 MiB of it anonymous) for nothing to fill."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["meta"] and out["numel"] == 134_105_856  # every parameter, shaped, none stored
    assert not out["dynamo"]
    assert out["grown"] < 16 << 20, out
