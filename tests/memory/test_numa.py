"""NUMA topology from sysfs (CXL candidates), and real placement with mbind checked by get_mempolicy."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest

from memfit.memory import numa

needs_libnuma = pytest.mark.skipif(numa.libnuma() is None, reason="libnuma (libnuma1) not installed")


def _node(root: Path, i: int, cpus: str, total_kb: int, free_kb: int) -> None:
    d = root / f"node{i}"
    d.mkdir(parents=True)
    (d / "cpulist").write_text(cpus + "\n")
    (d / "meminfo").write_text(f"Node {i} MemTotal:       {total_kb} kB\nNode {i} MemFree:        {free_kb} kB\n"
                               f"Node {i} MemUsed:        {total_kb - free_kb} kB\n")


def test_a_cpu_less_node_with_memory_is_a_cxl_candidate(tmp_path):
    _node(tmp_path, 0, "0-3,8", 1 << 20, 1 << 19)
    _node(tmp_path, 1, "", 1 << 22, 1 << 22)  # a CXL expander: memory, no CPUs
    _node(tmp_path, 2, "", 0, 0)  # neither: not a memory tier
    _node(tmp_path, 10, "4-7", 1 << 20, 1 << 20)  # numeric order, not text order
    nodes = numa.read_nodes(tmp_path)
    assert [n.id for n in nodes] == [0, 1, 2, 10]
    assert nodes[0].cpus == (0, 1, 2, 3, 8) and nodes[0].total_bytes == 1 << 30 and nodes[0].free_bytes == 1 << 29
    assert numa.cxl_candidates(nodes) == [1]


def test_this_machine_has_a_node_with_the_cpu_we_run_on():
    nodes = numa.read_nodes()
    assert nodes and all(n.total_bytes > 0 for n in nodes if n.cpus)
    assert numa.current_node(nodes) in {n.id for n in nodes}


@needs_libnuma
def test_mbind_before_first_touch_puts_the_pages_on_the_node():
    """Two ranges of one mapping, bound (MPOL_BIND) and striped (MPOL_INTERLEAVE) over node 0: the kernel
    reports each range's policy, and every touched page on node 0."""
    node = numa.read_nodes()[0].id
    head = 3 * numa.PAGE
    flat, addr = numa.map_on_nodes([(head, [node]), (5 * numa.PAGE + 100, [node, node])])
    assert flat.numel() == 8 * numa.PAGE + 100
    assert numa.policy_of(addr) == (numa.MPOL_BIND, [node])
    assert numa.policy_of(addr + head) == (numa.MPOL_INTERLEAVE, [node])
    flat.fill_(7)
    assert numa.pages_by_node(addr, flat.numel()) == {node: flat.numel()}
    assert int(flat.sum()) == 7 * flat.numel()


@needs_libnuma
def test_binding_to_a_node_that_does_not_exist_is_refused():
    missing = max(n.id for n in numa.read_nodes()) + 1
    with pytest.raises(numa.NumaError, match=f"node\\(s\\) \\[{missing}\\]"):
        numa.map_on_nodes([(numa.PAGE, [missing])])


@needs_libnuma
def test_the_mapping_goes_with_its_last_view():
    flat, addr = numa.map_on_nodes([(4 * numa.PAGE, [0])])
    view = flat[numa.PAGE:]
    del flat
    gc.collect()
    assert _mapped(addr)  # the view keeps it
    del view
    gc.collect()
    assert not _mapped(addr)


def _mapped(addr: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return True
    return False
