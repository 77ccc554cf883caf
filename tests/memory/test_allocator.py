"""AllocatorMeter: the allocator's peak within a block, checked against tensors of known size."""
import pytest
import torch

from memfit.memory.allocator import AllocatorMeter

MB = 1_000_000


def test_peak_counts_what_was_live_at_once_and_net_what_stayed():
    keep = None
    with AllocatorMeter() as m:
        a = torch.empty(2 * MB, dtype=torch.float32)  # 8 MB
        b = torch.empty(3 * MB, dtype=torch.float32)  # 12 MB: 20 MB live at once
        del a  # transient: counted in the peak, not in the net
        keep = torch.empty(MB, dtype=torch.float32)  # 4 MB, stays
        del b
    assert 20 * MB <= m.peak_bytes < 20 * MB + 64 * 1024
    assert 4 * MB <= m.net_bytes < 4 * MB + 64 * 1024
    assert m.result.events >= 5
    del keep


def test_freeing_older_tensors_does_not_count_as_allocation():
    old = torch.empty(4 * MB, dtype=torch.float32)
    with AllocatorMeter() as m:
        del old
        x = torch.empty(MB // 4, dtype=torch.float32)  # 1 MB
    assert MB <= m.peak_bytes < MB + 64 * 1024  # the peak is measured from the block's start
    del x


def test_a_training_step_allocates_its_activations_and_gradients():
    lin = torch.nn.Linear(1000, 1000, bias=False)  # weight: 4 MB
    x = torch.randn(250, 1000)
    with AllocatorMeter() as m:
        lin(x).sum().backward()  # output 1 MB, weight gradient 4 MB (new: .grad was None)
    assert m.net_bytes >= 4 * MB  # the gradient stays
    assert m.peak_bytes >= 5 * MB


def test_the_result_is_read_only_after_a_block():
    with pytest.raises(RuntimeError, match="not measured"):
        AllocatorMeter().peak_bytes


@pytest.mark.cuda
def test_cuda_peak_from_the_caching_allocator():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with AllocatorMeter("cuda") as m:
        a = torch.empty(2 * MB, device="cuda")
        b = torch.empty(3 * MB, device="cuda")
        del a, b
    assert 20 * MB <= m.peak_bytes < 21 * MB and abs(m.net_bytes) < MB


def test_meter_does_not_import_the_compiler():
    """The CPU meter uses autograd's profiler directly: torch.profiler's start asks `hasattr(torch, "_inductor")`,
    which imports torch._inductor and torch._dynamo (~150 MiB of RSS in the process it measures)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch\nfrom memfit.memory.allocator import AllocatorMeter\n"
            "with AllocatorMeter() as m:\n    x = torch.ones(1 << 20)\n"
            "print(m.peak_bytes >= 4 << 20, 'torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["True", "False", "False"]


def test_meter_keeps_no_record_per_operator():
    """Only the allocator's events are kept: 100k operators that allocate nothing grow the process's anonymous
    memory (the kernel's count) by well under what one record per operator takes (autograd's profiler with
    every operator recorded: 20 MiB here, ~200 bytes an operator), and the block reports no event."""
    from memfit.memory.measure import status_bytes

    x, y = torch.zeros(16), torch.ones(16)
    with AllocatorMeter() as m:
        before = status_bytes()["RssAnon"]
        for _ in range(100_000):
            x.add_(y)  # in place: no allocation
        grown = status_bytes()["RssAnon"] - before
    assert m.result.events == 0 and m.peak_bytes == 0
    assert grown < 4 << 20, grown
    assert torch.equal(x, torch.full((16,), 100_000.0))
