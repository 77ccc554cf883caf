import pytest
import torch
from torch import nn

from memfit.plan.analysis import scratchpad_sizes, without_weights
from memfit.plan.errors import UnknownModelError, UnsupportedGraphError
from memfit.plan.graph import extract_graph, graph_from_name
from memfit.plan.validate import check_graph


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):  # x: (B, 3, 16, 16)
        y = torch.relu(self.bn(self.conv(x)))  # (B, 8, 16, 16)
        y = y + y.permute(0, 1, 3, 2)  # a view feeding a real op
        return self.fc(y.flatten(1))  # (B, 10); flatten moves no data


def _tiny(batch=1, dtype=None):
    with torch.device("meta"):
        m = Tiny().eval()
    return extract_graph(m, (torch.empty(batch, 3, 16, 16, device="meta"),), name="tiny", dtype=dtype)


def test_extracts_ops_tensors_and_exact_bytes():
    g = _tiny()
    assert check_graph(g) == []
    types = [o.type for o in g.ops]
    assert types == ["aten.conv2d", "aten._native_batch_norm_legit_no_training", "aten.relu", "aten.add",
                     "aten.linear"]  # permute and flatten are not operators
    kinds = {t.name: t.kind for t in g.tensors}
    assert kinds["x"] == "input" and kinds["conv.weight"] == "weight" and kinds["bn.running_var"] == "weight"
    assert sum(k == "output" for k in kinds.values()) == 1
    by = g.tensor
    assert by["x"].bytes == 3 * 16 * 16 * 4
    assert by["conv.weight"].bytes == 8 * 3 * 3 * 3 * 4
    conv_out = g.ops[0].outputs[0]
    assert by[conv_out].bytes == 8 * 16 * 16 * 4
    add = g.ops[3]
    relu_out = g.ops[2].outputs[0]
    assert add.inputs == [relu_out]  # y + y.permute(...) reads one tensor
    assert g.op[g.ops[4].name].inputs[0] == add.outputs[0]  # linear reads the add result through the flatten view
    assert by["fc.weight"].bytes == 10 * 2048 * 4


def test_dtype_and_batch_change_sizes():
    g32, g16, g32b2 = _tiny(), _tiny(dtype=torch.float16), _tiny(batch=2)
    act = g32.ops[0].outputs[0]
    assert g16.tensor[act].bytes * 2 == g32.tensor[act].bytes
    assert g16.tensor["conv.weight"].bytes * 2 == g32.tensor["conv.weight"].bytes
    assert g32b2.tensor[act].bytes == 2 * g32.tensor[act].bytes
    assert g32b2.tensor["conv.weight"].bytes == g32.tensor["conv.weight"].bytes


def test_without_weights_and_sizes():
    g = without_weights(_tiny())
    assert check_graph(g) == [] and all(t.kind != "weight" for t in g.tensors)
    s = scratchpad_sizes(g)
    assert s.min_feasible <= s.mid <= s.min_peak


def test_data_dependent_control_flow_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(UnsupportedGraphError, match="cannot trace 'branchy'"):
        extract_graph(Branchy(), (torch.ones(2, 2),), name="branchy")


def test_unknown_model_name_suggests():
    with pytest.raises(UnknownModelError, match="resnet18"):
        graph_from_name("resnet_18")


def test_builtin_bert_encoder_from_name():
    g = graph_from_name("bert_tiny_encoder")
    assert check_graph(g) == []
    assert sum(o.type == "aten.scaled_dot_product_attention" for o in g.ops) == 2
    (x,) = [t for t in g.tensors if t.kind == "input"]
    assert x.bytes == 128 * 128 * 4  # (B=1, T=128, C=128) float32


def test_torchvision_model_on_meta():
    g = graph_from_name("resnet18")
    assert check_graph(g) == []
    assert sum(o.type == "aten.conv2d" for o in g.ops) == 20
    weights = sum(t.bytes for t in g.tensors if t.kind == "weight")
    # 11,689,512 parameters + BN running mean/var (4,800 channels); unused num_batches_tracked is not a tensor
    assert weights == 4 * (11689512 + 2 * 4800)


def test_onnx_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from memfit.plan.onnx_graph import graph_from_onnx

    w = numpy_helper.from_array(np.zeros((16, 8), dtype=np.float32), "W")
    shape = numpy_helper.from_array(np.array([-1, 2, 4], dtype=np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    g = graph_from_onnx(path, batch=4)
    assert [o.name for o in g.ops] == ["mm", "relu"]  # Reshape aliases
    assert g.tensor["x"].bytes == 4 * 16 * 4 and g.tensor["W"].bytes == 16 * 8 * 4
    assert g.tensor["r"].kind == "output" and g.tensor["h"].bytes == 4 * 8 * 4
    assert graph_from_onnx(path, batch=4, dtype="float16").tensor["h"].bytes == 4 * 8 * 2

    bad = helper.make_graph([helper.make_node("Mystery", ["x"], ["z"], name="m", domain="acme")], "g",
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                            [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    bad_path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(bad, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)]),
              str(bad_path))
    with pytest.raises(UnsupportedGraphError, match="unsupported op Mystery"):
        graph_from_onnx(bad_path)
