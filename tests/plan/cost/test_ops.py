"""ops.check_readable: what `predict` refuses rather than predict from part of a kernel, and that it takes every
kernel of the data set."""
import pytest

from memfit.plan.cost import families
from memfit.plan.cost.errors import MlirParseError
from memfit.plan.cost.ops import check_readable
from memfit.plan.cost.parse import pick_function

from .conftest import TINY_MATMUL


def test_every_family_and_tile_candidate_is_readable():
    for spec in families.generate(300, seed=5) + families.generate_tuned(3, seed=5):
        assert check_readable(pick_function(families.render(spec)))


@pytest.mark.parametrize("old, new, words", [
    ("arith.constant", "scf.constant", "op scf.constant is not one"),
    ("%zero = arith.constant 0.0 : f32", '%zero = "foo.bar"() : () -> f32', "op foo.bar is not one"),
    ("tensor<16x32xf32>, tensor<32x16xf32>)", "tensor<16x32x1xf32>, tensor<32x16xf32>)",
     "expected inputs of rank 2, 2"),
    ("outs(%acc : tensor<16x16xf32>) -> tensor<16x16xf32>\n", "\n", "no result tensor"),
    ("%lhs: tensor<16x32xf32>", "%lhs: tensor<0x32xf32>", "tensor<0x32xf32> is empty"),
])
def test_what_the_model_cannot_read_is_refused(old, new, words):
    assert old in TINY_MATMUL
    with pytest.raises(MlirParseError, match=words):
        check_readable(pick_function(TINY_MATMUL.replace(old, new)))


def test_an_attribute_name_with_a_dot_is_not_an_op():
    assert check_readable(pick_function(TINY_MATMUL.replace("linalg.matmul", "linalg.matmul {some.attr = 1}")))


def test_a_linalg_attribute_is_not_read_as_an_op():
    # `#linalg.type_fn<...>` was read as an op without operands, and the matmul refused as "no result tensor"
    with_cast = TINY_MATMUL.replace("linalg.matmul", "linalg.matmul {cast = #linalg.type_fn<cast_signed>}")
    assert with_cast != TINY_MATMUL
    ops = [op.name for op in check_readable(pick_function(with_cast))]
    assert ops == [op.name for op in check_readable(pick_function(TINY_MATMUL))] and "linalg.matmul" in ops
