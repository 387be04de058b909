"""The benchmark's exposed all-to-all time: communication not covered by any compute, checked
against counting a fine grid of time points."""

from __future__ import annotations

import numpy as np
import pytest

from bench.layout import exposed_time, merged


def grid_exposed(communication, compute, step: float = 0.01) -> float:
    points = np.arange(0.0, 110.0, step) + step / 2  # every span ends before 103

    def inside(spans):
        return np.any([(points >= a) & (points < b) for a, b in spans] or [points < -1], axis=0)

    return float(np.sum(inside(communication) & ~inside(compute)) * step)


def test_merged_is_a_sorted_disjoint_union():
    assert merged([(5, 7), (1, 3), (2, 4), (7, 8), (9, 9)]) == [(1, 4), (5, 8)]


@pytest.mark.parametrize("seed", range(5))
def test_exposed_time_matches_a_grid_count(seed):
    rng = np.random.default_rng(seed)

    def spans(n):
        starts = np.round(rng.uniform(0, 95, n), 2)
        return [(float(s), float(s + np.round(rng.uniform(0.1, 8), 2))) for s in starts]

    communication, compute = spans(12), spans(20)
    assert exposed_time(communication, compute) == pytest.approx(
        grid_exposed(communication, compute), abs=0.05
    )
    assert exposed_time(communication, []) == pytest.approx(sum(b - a for a, b in merged(communication)))
    assert exposed_time(communication, [(0.0, 200.0)]) == 0.0
