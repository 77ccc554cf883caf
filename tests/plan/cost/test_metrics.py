import numpy as np
import pytest

from memfit.plan.cost.metrics import kendall, mape, spearman


def test_rank_metrics():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x ** 2) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert kendall(x, x[::-1]) == pytest.approx(-1.0)
    assert kendall(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(4 / 6)


def test_mape():
    assert mape(np.array([110.0, 90.0]), np.array([100.0, 100.0])) == pytest.approx(0.1)
