"""Class-incremental metrics against hand-computed values."""

from __future__ import annotations

import pytest

from fedcil.metrics import summary

# a[t][i]: accuracy on task i after training task t
MATRIX = [
    [90.0, None, None],
    [70.0, 80.0, None],
    [60.0, 50.0, 100.0],
]


def test_metrics_by_hand():
    m = summary(MATRIX, counts=[100, 100, 200])
    assert m["faa"] == pytest.approx((60 + 50 + 100) / 3)
    assert m["faa_weighted"] == pytest.approx((60 * 100 + 50 * 100 + 100 * 200) / 400)
    assert m["aia"] == pytest.approx((90 + (70 + 80) / 2 + (60 + 50 + 100) / 3) / 3)
    # forgetting: task 0 best earlier 90 -> 60 (30); task 1 best 80 -> 50 (30)
    assert m["forgetting"] == pytest.approx(30.0)
    # bwt: (60 - 90 + 50 - 80) / 2
    assert m["bwt"] == pytest.approx(-30.0)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    matrix = [[50.0, None, None], [80.0, 70.0, None], [40.0, 70.0, 90.0]]
    m = summary(matrix, counts=[1, 1, 1])
    assert m["forgetting"] == pytest.approx(((80 - 40) + (70 - 70)) / 2)
    assert m["bwt"] == pytest.approx(((40 - 50) + (70 - 70)) / 2)


def test_single_task_has_no_forgetting():
    m = summary([[75.0]], counts=[10])
    assert m["faa"] == m["aia"] == m["faa_weighted"] == 75.0
    assert m["forgetting"] is None and m["bwt"] is None
