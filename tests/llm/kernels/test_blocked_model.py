"""use_blocked_linears (memfit/llm/kernels/blocked_model.py): weights packed once, the unpacked copies given back."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memfit.llm.kernels.blocked import can_use_blocked
from memfit.memory.mapping import get_libc
from memfit.memory.measure import anon_shmem_bytes

ROOT = Path(__file__).resolve().parents[3]

# Run in a fresh process: a heap that earlier tests have fragmented gives back fewer whole pages.
_SCRIPT = r"""
import json, torch
from torch import nn
from memfit.llm.kernels.blocked_model import use_blocked_linears
from memfit.memory.measure import anon_shmem_bytes
MiB = 2**20
use_blocked_linears(nn.Sequential(nn.Linear(64, 64, bias=False)), huge_pages=False)  # the kernel library loaded
big = torch.ones(8 * MiB, dtype=torch.uint8)  # mapped on its own; freed, it raises glibc's threshold to 8 MiB
del big
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(12)])  # 12 x 1 MiB of fp32, on the heap
model.requires_grad_(False)  # no autograd graph may keep a weight alive
unpacked = sum(p.numel() * p.element_size() for p in model.parameters())
x = torch.randn(3, 512)
want = model(x)
before = anon_shmem_bytes()
count = use_blocked_linears(model, huge_pages=False)
grown = anon_shmem_bytes() - before
err = float((model(x) - want).abs().max())
print(json.dumps({"count": count, "unpacked": unpacked, "grown": grown, "err": err}))
"""


@pytest.mark.skipif(not can_use_blocked(torch.float32), reason="memfit's blocked kernel does not run here")
@pytest.mark.skipif(anon_shmem_bytes() is None or getattr(get_libc(), "malloc_trim", None) is None,
                    reason="needs /proc/self/status and glibc")
def test_packing_weights_on_the_heap_gives_their_pages_back():
    """Weights converted at load live on the C heap, not in the checkpoint's mapping. Packed one by one, the
    process must hold them about once, not unpacked + packed: measured by the kernel's count of anonymous pages,
    independent of memfit's own accounting. Freeing an 8 MiB block first raises glibc's mmap threshold (as a
    loader's larger temporaries do), so the 1 MiB weights come from the heap, where a free keeps them resident."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["count"] == 12 and r["err"] < 1e-4
    # Packed (12 MiB) replaced unpacked (12 MiB): near zero; holding both would be ~12 MiB more.
    assert r["grown"] < 0.25 * r["unpacked"], f"held {r['grown'] / 2**20:.1f} MiB more after packing 12 MiB of weights"
