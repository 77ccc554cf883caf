"""Suite-wide test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The suite runs on a shared 2-core machine and starts servers in subprocesses: one thread per process
    # avoids OpenMP threads spin-waiting against each other (scripts/test also sets OMP_NUM_THREADS=1).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
