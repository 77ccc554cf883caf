"""Tier backends: real placement where libnuma is, simulated CXL nodes, and each request the machine cannot
honour falling back to plain allocations with a warning."""
from __future__ import annotations

import logging

import pytest
import torch

from memfit.memory import numa
from memfit.memory.tiers import Tier, TierSystem, allocate, numastat

needs_libnuma = pytest.mark.skipif(numa.libnuma() is None, reason="libnuma (libnuma1) not installed")


@pytest.fixture
def no_libnuma(monkeypatch):
    monkeypatch.setattr(numa, "LIBNUMA_NAME", "libnuma-not-installed.so.9")
    monkeypatch.setattr(numa, "_lib_tried", None)
    monkeypatch.setattr(numa, "_lib", None)  # both restored afterwards: later tests see the real library


def test_libnuma_missing_falls_back_to_plain_with_a_warning(no_libnuma, caplog):
    with caplog.at_level(logging.WARNING):
        system = TierSystem.open("libnuma")
    assert system.backend == "plain"
    assert any("libnuma" in w and "plain" in w for w in system.warnings)
    assert "libnuma-not-installed.so.9" in caplog.text
    t = system.allocate((3, 5), torch.float32, system.local, "x")
    t.copy_(torch.arange(15.0).view(3, 5))
    assert t.sum().item() == 105.0
    assert system.report()["x"]["measured"] == {}  # nothing to read pages back with


def test_a_node_that_does_not_exist_falls_back_to_plain_with_a_warning(caplog):
    missing = max(n.id for n in numa.read_nodes()) + 5
    with caplog.at_level(logging.WARNING):
        system = TierSystem.open("auto", slow_nodes=[missing])
    assert system.backend == "plain" and str(missing) in caplog.text and "do not exist" in system.warnings[0]
    system = TierSystem.open("auto", local_node=missing)
    assert system.backend == "plain" and system.local.nodes == (numa.current_node(numa.read_nodes()),)


def test_a_budget_larger_than_the_local_node_falls_back_to_plain_with_a_warning():
    node = numa.read_nodes()[0]
    system = TierSystem.open("auto", local_node=node.id, local_budget=2 * node.total_bytes)
    assert system.backend == "plain" and "larger than node" in system.warnings[0]
    assert TierSystem.open("simulated", local_budget=node.total_bytes // 4).backend == "simulated"


def test_simulated_nodes_are_booked_not_placed():
    system = TierSystem.open("simulated", simulated_cxl=2)
    real = {n.id for n in numa.read_nodes()}
    assert system.modelled and system.slow is not None and len(system.slow.nodes) == 2
    assert not set(system.slow.nodes) & real
    page = numa.PAGE
    t = system.allocate(3 * page // 4, torch.float32, [(page, system.local), (2 * page, system.slow)], "g")
    t.fill_(1.5)
    rep = system.report()["g"]
    assert rep["bytes"] == 3 * page and rep["measured"] == {}
    assert rep["planned"] == {str(system.local.nodes[0]): page, **{str(n): page for n in system.slow.nodes}}
    table = numastat(system.report(), "planned")
    assert table.splitlines()[0].split()[0] == "group" and "g" in table


def test_segments_must_cover_the_tensor():
    system = TierSystem.open("plain")
    with pytest.raises(ValueError, match="segments hold"):
        system.allocate(1024, torch.float32, [(100, system.local)])
    with pytest.raises(ValueError, match="unknown tier backend"):
        TierSystem.open("cxl")


@needs_libnuma
def test_real_backend_reports_where_the_pages_are():
    system = TierSystem.open("libnuma")
    assert system.backend == "libnuma" and not system.warnings
    node = system.local.nodes[0]
    a = allocate(300_000, torch.float32, system.local, system, "weights")
    b = allocate((64, 33), torch.bfloat16, [(numa.PAGE, system.local), (64 * 33 * 2 - numa.PAGE, Tier("x", (node,)))],
                 system, "weights")
    a.fill_(2.0)
    b.fill_(1.0)
    rep = system.report()["weights"]
    assert rep["measured"] == {str(node): a.numel() * 4 + b.numel() * 2} == rep["planned"]
    assert numa.policy_of(a.data_ptr()) == (numa.MPOL_BIND, [node])
    del a, b
    assert system.report()["weights"]["measured"] == {}  # freed: not read back


@needs_libnuma
def test_mbind_refused_falls_back_to_plain_with_a_warning(monkeypatch):
    """libnuma loads but the kernel (or a seccomp filter) refuses mbind: plain allocations, and why."""
    real = numa.libnuma()

    class Refusing:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def mbind(*args):
            import ctypes

            ctypes.set_errno(1)  # EPERM
            return -1

    monkeypatch.setattr(numa, "libnuma", lambda: Refusing())
    system = TierSystem.open("libnuma")
    assert system.backend == "plain" and "mbind is refused" in system.warnings[0] and "EPERM" in system.warnings[0]
