"""benchmarks/capacity.py's simulation against queueing theory: an M/G/1 processor-sharing server has a mean
sojourn time of E[S] / (1 - rho) whatever the size distribution; the plan grows with the rate and refuses what
no number of replicas under the cap can serve."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import capacity


@pytest.mark.parametrize("mu, lam", [(10.0, 5.0), (10.0, 8.0)])
def test_one_replica_matches_mg1_processor_sharing(mu, lam):
    lat = capacity.simulate({1: mu}, 1, lam, n=30000, seed=3)  # X(n) = mu for every n >= 1
    want = (1 / mu) / (1 - lam / mu)
    assert np.mean(lat) == pytest.approx(want, rel=0.08)


def test_least_request_balancing_and_plan():
    curve = {1: 4.0, 8: 14.0, 32: 14.0}
    one = capacity.simulate(curve, 1, 10.0, n=8000)
    two = capacity.simulate(curve, 2, 10.0, n=8000)
    assert np.percentile(two, 95) < np.percentile(one, 95)  # a second replica shortens the tail
    assert capacity.rate_at(curve, 0) == 0 and capacity.rate_at(curve, 100) == 14.0
    assert capacity.rate_at(curve, 4) == pytest.approx(4 + (14 - 4) * 3 / 7)
    n10, p10 = capacity.plan(curve, 10, 2000)
    n50, p50 = capacity.plan(curve, 50, 2000)
    assert 1 <= n10 < n50 and n50 >= 50 / 14 and p10 <= 2000 and p50 <= 2000
    assert capacity.plan(curve, 10_000, 2000, max_replicas=64) == (-1, float("inf"))
