"""Shared by the kernel tests: every test builds memfit's kernels into a temporary cache, never the user's."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """One build per test session, in a temporary cache."""
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "memfit-kernels"))
