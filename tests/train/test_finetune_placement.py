"""`memfit train finetune --placement`: the plan by priority and budget, losses bit-identical to local-only on
every policy and backend, the numastat-style report, and the errors."""
from __future__ import annotations

import json

import pytest
import torch

from memfit.memory import numa
from memfit.train.finetune.placement import (
    KIND_GROUP,
    Placement,
    PlacementConfig,
    PlacementError,
    parse_budget,
)
from memfit.train.finetune.trainer import FinetuneError, run

from tests.train.test_finetune import cfg, make_tiny, write_chat_data

needs_libnuma = pytest.mark.skipif(numa.libnuma() is None, reason="libnuma (libnuma1) not installed")
MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _items():
    """Two groups of 1 MiB per fp32 tensor, bf16 copies, one flat gradient buffer."""
    items = [(("grad", -1), 2 * MiB)]
    for gi in range(2):
        items += [((k, gi), MiB) for k in ("master", "exp_avg", "exp_avg_sq")] + [(("param", gi), MiB // 2)]
    return items  # 9 MiB in all


def _where(p: Placement, key) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, tier in p.plan[key]:
        out[tier.name] = out.get(tier.name, 0) + n
    return out


def test_latency_first_fills_the_budget_by_priority_and_splits_at_a_page():
    p = Placement(PlacementConfig("latency-first", "4.5MiB", "simulated", simulated_cxl=2), _items())
    assert p.budget == int(4.5 * MiB)
    for gi in range(2):  # priority 1: moments, all local
        assert _where(p, ("exp_avg", gi)) == _where(p, ("exp_avg_sq", gi)) == {"local": MiB}
    assert _where(p, ("grad", -1)) == {"local": MiB // 2, "cxl": 3 * MiB // 2}  # priority 2 straddles the budget
    for gi in range(2):  # priorities 3 and 4: on the CXL nodes, striped over both
        assert _where(p, ("master", gi)) == {"cxl": MiB} and _where(p, ("param", gi)) == {"cxl": MiB // 2}
    assert p.plan[("master", 0)][0][1].nodes == p.system.slow.nodes and len(p.system.slow.nodes) == 2
    # a percentage is of the placed state; 100% keeps everything local
    assert Placement(PlacementConfig("latency-first", "50%", "simulated"), _items()).budget == 9 * MiB // 2
    full = Placement(PlacementConfig("latency-first", "100%", "simulated"), _items())
    assert all(_where(full, k) == {"local": n} for k, n in _items())


def test_interleave_stripes_everything_and_local_only_keeps_it_home():
    p = Placement(PlacementConfig("interleave", None, "simulated", simulated_cxl=2), _items())
    nodes = p.system.local.nodes + p.system.slow.nodes
    assert all(seg[0][1].nodes == nodes and len(seg) == 1 for seg in p.plan.values())
    p = Placement(PlacementConfig("local-only", None, "simulated"), _items())
    assert all(_where(p, k) == {"local": n} for k, n in _items())


def test_budget_and_policy_errors():
    assert parse_budget("25%", 400) == 100 and parse_budget("1KiB", 0) == 1024 and parse_budget(5, 0) == 5
    for bad in ("150%", "x%", "lots"):
        with pytest.raises(PlacementError, match="--local-budget"):
            parse_budget(bad, 100)
    with pytest.raises(PlacementError, match="needs --local-budget"):
        PlacementConfig("latency-first").validate()
    with pytest.raises(PlacementError, match="latency-first only"):
        PlacementConfig("interleave", "50%").validate()
    with pytest.raises(PlacementError, match="--placement must be"):
        PlacementConfig("numa").validate()


def test_losses_are_bit_identical_to_local_only_on_every_policy(tiny, tmp_path):
    """Placement moves bytes, never arithmetic: every policy and backend gives local-only's losses exactly
    (host checkpoints placed too), and so does a run without placement."""
    base = dict(steps=3, grad_checkpointing="host")
    ref = run(cfg(tiny, tmp_path, placement=PlacementConfig("local-only", None, "simulated"), **base))
    assert ref.losses[-1] < ref.losses[0]
    runs = {
        "none": cfg(tiny, tmp_path, **base),
        "interleave": cfg(tiny, tmp_path, placement=PlacementConfig("interleave", None, "simulated", simulated_cxl=2),
                          **base),
        "latency-first 25%": cfg(tiny, tmp_path, placement=PlacementConfig("latency-first", "25%", "simulated"),
                                 **base),
        "latency-first host tier": cfg(tiny, tmp_path, offload="host",
                                       placement=PlacementConfig("latency-first", "60%", "auto"), **base),
    }
    for name, c in runs.items():
        result = run(c)
        assert result.losses == ref.losses, name
    placed = result.placement
    assert set(placed["groups"]) >= {KIND_GROUP[k] for k in KIND_GROUP} | {"compute gradients"}


def test_simulated_run_reports_modelled_times_and_the_groups_on_cxl(tiny, tmp_path):
    r = run(cfg(tiny, tmp_path, steps=2, grad_checkpointing="host",
                placement=PlacementConfig("latency-first", "50%", "simulated")))
    pl = r.placement
    cxl = str(pl["slow_tier"]["nodes"][0])
    assert pl["backend"] == "simulated" and pl["modelled"] is True and pl["source"].startswith("policy")
    # bytes per parameter: moments 8, master gradient 4, master 4, bf16 copy 2: the moments (44%) fit in 50%,
    # the gradients straddle the budget
    assert pl["groups"]["optimizer moments"]["planned"].get(cxl, 0) == 0
    assert 0 < pl["groups"]["master gradients"]["planned"][cxl] < pl["groups"]["master gradients"]["bytes"]
    assert pl["groups"]["compute weights"]["planned"][cxl] == pl["groups"]["compute weights"]["bytes"]
    assert pl["groups"]["activation checkpoints"]["planned"][cxl] > 0  # nothing of the budget left for them
    m = pl["modelled_times"]
    assert m["modelled"] is True and m["optimizer_slowdown"] >= 1.0 and m["step_seconds"] > 0
    assert m["slow_tier_stream_bytes_per_step"] > 0 and "2507.03305" in m["cost_model"]["source"]
    assert len(r.optimizer_seconds) == 2


@needs_libnuma
def test_real_nodes_report_pages_from_get_mempolicy(tiny, tmp_path):
    r = run(cfg(tiny, tmp_path, steps=1, placement=PlacementConfig("local-only", None, "libnuma")))
    pl = r.placement
    node = str(pl["local_node"])
    assert pl["backend"] == "libnuma" and pl["source"].startswith("get_mempolicy")
    for name in ("optimizer moments", "master gradients", "master weights", "compute weights"):
        g = pl["groups"][name]
        assert g["measured"] == {node: g["bytes"]} and g["bytes"] > 0
    assert f"node {node}" in pl["numastat"].splitlines()[0]


def test_cli_json_has_the_placement_and_bad_settings_are_clear(tiny, tmp_path, capsys):
    from memfit.cli import main

    data = str(write_chat_data(tmp_path / "c.jsonl"))
    common = ["train", "finetune", "--model", str(tiny), "--data", data, "--steps", "1", "--seq-len", "32",
              "--no-progress", "--threads", "1"]
    missing = max(n.id for n in numa.read_nodes()) + 3
    rc = main(common + ["--placement", "interleave", "--slow-nodes", str(missing), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["placement"]["backend"] == "plain"
    assert f"node(s) {missing} do not exist" in out["placement"]["warnings"][0]
    assert out["placement"]["policy"] == "interleave" and "numastat" in out["placement"]
    assert main(common + ["--local-budget", "50%"]) == 2
    assert "needs --placement latency-first" in capsys.readouterr().err
    assert main(common + ["--placement", "latency-first"]) == 2
    assert "needs --local-budget" in capsys.readouterr().err
    assert main(common + ["--placement", "local-only", "--offload", "ssd", "--ssd-dir", str(tmp_path)]) == 2
    assert "host memory" in capsys.readouterr().err
    assert main(common + ["--placement", "local-only", "--slow-nodes", "a,b"]) == 2
    with pytest.raises(FinetuneError, match="host memory"):
        run(cfg(tiny, tmp_path, offload="ssd", placement=PlacementConfig()))


@needs_libnuma
def test_real_split_and_striped_tensors_on_one_node(tiny, tmp_path):
    """Node 0 as both tiers: latency-first's split tensors and interleave's stripes go through real mbind
    (MPOL_BIND / MPOL_INTERLEAVE ranges), every touched page reads back on node 0, and the losses stay
    local-only's."""
    from memfit.memory.numa import MPOL_BIND, MPOL_INTERLEAVE, policy_of

    node = numa.current_node(numa.read_nodes())
    ref = run(cfg(tiny, tmp_path, steps=2))
    for policy, budget in (("latency-first", "50%"), ("interleave", None)):
        pc = PlacementConfig(policy, budget, "libnuma", local_node=node, slow_nodes=[node])
        r = run(cfg(tiny, tmp_path, steps=2, placement=pc))
        assert r.losses == ref.losses, policy
        groups = r.placement["groups"]
        for name in ("optimizer moments", "master gradients", "master weights", "compute weights"):
            assert groups[name]["measured"] == {str(node): groups[name]["bytes"]}, (policy, name)
    # the policies themselves, on a plan's tensors
    p = Placement(PlacementConfig("latency-first", "50%", "libnuma", local_node=node, slow_nodes=[node]), _items())
    grad = p.tensor(("grad", -1), 2 * MiB // 4, torch.float32)
    assert [n for n, _ in p.plan[("grad", -1)]] == [MiB // 2, 3 * MiB // 2]
    assert policy_of(grad.data_ptr()) == (MPOL_BIND, [node])
    assert policy_of(grad.data_ptr() + MiB // 2) == (MPOL_BIND, [node])
    p = Placement(PlacementConfig("interleave", None, "libnuma", local_node=node, slow_nodes=[node]), _items())
    striped = p.tensor(("master", 0), MiB // 4, torch.float32)
    assert policy_of(striped.data_ptr()) == (MPOL_INTERLEAVE, [node])
