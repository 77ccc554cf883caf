"""The MLIR reader and the token normaliser."""
import pytest

from memfit.plan.cost.errors import MlirParseError
from memfit.plan.cost.features import features
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.tokens import tokenize

from .conftest import TINY_MATMUL


def test_signature_and_input_flags():
    fn = pick_function(TINY_MATMUL)
    assert [a.input_flag() for a in fn.args] == ["16x32xf32", "32x16xf32"]
    assert fn.results[0].shape == (16, 16)


def test_function_choice_errors():
    with pytest.raises(MlirParseError, match="no func.func"):
        pick_function("module {}")
    two = TINY_MATMUL + TINY_MATMUL.replace("@main", "@other")
    with pytest.raises(MlirParseError, match="--function"):
        pick_function(two)
    assert pick_function(two, "other").name == "other"
    with pytest.raises(MlirParseError, match="no function @nope"):
        pick_function(two, "nope")
    with pytest.raises(MlirParseError, match="static"):
        pick_function(TINY_MATMUL.replace("tensor<16x32xf32>", "tensor<?x32xf32>"))


def test_ssa_names_do_not_change_tokens():
    renamed = TINY_MATMUL.replace("%lhs", "%a").replace("%rhs", "%b").replace("%acc", "%x9").replace("%out", "%y")
    assert tokenize(pick_function(renamed)) == tokenize(pick_function(TINY_MATMUL))


def test_shapes_are_numeric_values_not_tokens():
    t1, v1 = tokenize(pick_function(TINY_MATMUL))
    t2, v2 = tokenize(pick_function(TINY_MATMUL.replace("16x", "48x")))
    assert t1 == t2 and v1 != v2
    assert "<dim>" in t1 and "16" not in t1


def test_features_see_the_matmul():
    f = features(pick_function(TINY_MATMUL))
    assert f["n_matmul"] == 1 and f["dtype_f32"] == 1
    assert f["log_m"] == 4 and f["log_n"] == 4 and f["log_k"] == 5


def test_a_function_cut_short_is_refused_and_braces_in_comments_and_strings_do_not_count():
    with pytest.raises(MlirParseError, match="@main has no closing brace"):
        pick_function(TINY_MATMUL.rstrip().removesuffix("}"))
    with pytest.raises(MlirParseError, match="braces do not balance"):
        pick_function("module {\n" + TINY_MATMUL)
    commented = TINY_MATMUL.replace("return", '// a } in a comment\n  "test.note" = "{" \n  return')
    assert pick_function(commented).body.count("return") == 1
