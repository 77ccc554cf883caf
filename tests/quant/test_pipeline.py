"""QuantRun's flags are checked before any data is loaded."""
from __future__ import annotations

import pytest

from memfit.quant.errors import QuantError
from memfit.quant.pipeline import QuantRun


@pytest.mark.parametrize("n", [0, -1])
def test_max_test_must_name_at_least_one_image(n):
    # 0 scored no image and reported top-1 0.0000; -1 sliced the test set to all but its last image
    with pytest.raises(QuantError, match="--max-test must be at least 1"):
        QuantRun(model="m.safetensors", act_bits=4, max_test=n).validate()


@pytest.mark.parametrize("n", [None, 1, 10_000])
def test_max_test_left_out_or_positive_is_accepted(n):
    QuantRun(model="m.safetensors", act_bits=4, max_test=n).validate()
