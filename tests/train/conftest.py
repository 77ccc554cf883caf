import pytest


@pytest.fixture(scope="session")
def digits():
    from memfit.train.local.data import load_digits

    return load_digits(seed=0)
