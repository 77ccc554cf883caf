import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # tests run on a shared 2-core machine: keep torch to one thread
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def digits():
    from memfit.train.local.data import load_digits

    return load_digits(seed=0)
