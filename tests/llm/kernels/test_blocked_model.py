"""use_blocked_linears (memfit/llm/kernels/blocked_model.py): weights packed once, the unpacked copies given back."""
import pytest
import torch
from torch import nn

from memfit.llm.kernels.blocked import can_use_blocked
from memfit.llm.kernels.blocked_model import use_blocked_linears
from memfit.memory.mapping import get_libc
from memfit.memory.measure import anon_shmem_bytes

MiB = 2**20


@pytest.mark.skipif(not can_use_blocked(torch.float32), reason="memfit's blocked kernel does not run here")
@pytest.mark.skipif(anon_shmem_bytes() is None or getattr(get_libc(), "malloc_trim", None) is None,
                    reason="needs /proc/self/status and glibc")
def test_packing_weights_on_the_heap_gives_their_pages_back():
    """Weights converted at load live on the C heap, not in the checkpoint's mapping. Packed one by one, the
    process must hold them about once, not unpacked + packed: measured by the kernel's count of anonymous pages,
    independent of memfit's own accounting. Freeing an 8 MiB block first raises glibc's mmap threshold (as a
    loader's larger temporaries do), so the 1 MiB weights come from the heap, where a free keeps them resident."""
    big = torch.ones(8 * MiB, dtype=torch.uint8)  # mapped on its own; freed, it raises the threshold to 8 MiB
    del big
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(12)])  # 12 x 1 MiB of fp32 on the heap
    unpacked = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(3, 512)
    with torch.no_grad():  # no graph: it would keep the weights alive
        want = model(x)
    before = anon_shmem_bytes()
    assert use_blocked_linears(model, huge_pages=False) == 12
    grown = anon_shmem_bytes() - before
    # Packed (12 MiB) replaced unpacked (12 MiB): near zero; holding both would be ~12 MiB more.
    assert grown < 0.4 * unpacked, f"held {grown / MiB:.1f} MiB more after packing {unpacked / MiB:.0f} MiB of weights"
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
