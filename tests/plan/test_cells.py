"""Branched networks built here: Watts-Strogatz wiring, RandWire and DARTS modules (meta device, no weights)."""
import pytest

torch = pytest.importorskip("torch")
nx = pytest.importorskip("networkx")

from memfit.plan.cells import DARTS_V2_NORMAL, DartsConfig, RandWireConfig, darts, randwire, ws_dag  # noqa: E402
from memfit.plan.zoo import build_model  # noqa: E402


@pytest.mark.parametrize("seed", range(3))
def test_ws_dag_is_the_networkx_graph_oriented_low_to_high(seed):
    preds = ws_dag(16, 4, 0.75, seed)
    ref = nx.connected_watts_strogatz_graph(16, 4, 0.75, seed=seed)
    assert sum(len(p) for p in preds) == ref.number_of_edges() == 16 * 4 // 2
    assert all(q < i for i, ps in enumerate(preds) for q in ps)  # acyclic by construction
    assert {tuple(sorted(e)) for e in ref.edges()} == {(q, i) for i, ps in enumerate(preds) for q in ps}


def test_randwire_and_darts_run_on_meta_with_the_published_shapes():
    with torch.device("meta"):
        rw = randwire(RandWireConfig(nodes=8, stages=2, channels=16))
        y = rw(torch.empty(2, 3, 32, 32))
    assert y.shape == (2, 10)
    convs = [m for m in rw.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 8 * 2  # stem + (depthwise, pointwise) per node per stage
    with torch.device("meta"):
        net = darts(DartsConfig(cells=3, channels=8))
        y = net(torch.empty(2, 3, 32, 32))
    assert y.shape == (2, 10)
    assert len(net.cells[0].ops) == len(DARTS_V2_NORMAL) == 8


def test_builtin_names_build_without_weights():
    model, x = build_model("darts_v2_cifar", batch=3)
    assert x.shape == (3, 3, 32, 32) and x.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())
