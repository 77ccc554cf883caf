"""Shared by the kernel tests: every test builds memfit's kernels into a temporary cache, never the user's."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """One build per test session, in a temporary cache."""
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "memfit-kernels"))


@pytest.fixture
def fresh_large_m_choices():
    """large_m's per-shape kernel choices measured afresh, nothing forced, and left as they were found."""
    from memfit.llm.kernels import large_m

    large_m.reset()
    old = large_m.force(None)
    yield
    large_m.force(old)
    large_m.reset()
