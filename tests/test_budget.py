"""The measured render budget: a fixed start, then a high percentile of the frames' lags with a margin."""

from __future__ import annotations

import numpy as np
import pytest

from edtalk_live.realtime.budget import RenderBudget


def test_initial_until_warm_then_measured():
    b = RenderBudget(initial=0.1, floor=0.03, warmup=50, quantile=99, margin=1.2, slack=0.01)
    for _ in range(49):
        b.report(0.02)
    assert not b.measured() and b.current() == pytest.approx(0.1)
    b.report(0.02)
    assert b.measured() and b.current() == pytest.approx(max(0.02 * 1.2 + 0.01, 0.03))


def test_a_load_not_run_at_yet_gets_the_initial_budget():
    b = RenderBudget(initial=0.1, warmup=20, margin=1.0, slack=0.0, floor=0.01)
    for _ in range(50):
        b.report(0.02, load=1)
    assert b.current(1) == pytest.approx(0.02)
    assert b.current(2) == pytest.approx(0.1)       # measured with one session: not given to the second
    for _ in range(50):
        b.report(0.05, load=2)
    assert b.current(2) == pytest.approx(0.05)
    assert b.current(1) == pytest.approx(0.05)      # loads at or above: the worst that was seen


def test_follows_the_load_both_ways_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    b = RenderBudget(floor=0.03, ceiling=0.5, window=200, warmup=10, margin=1.2, slack=0.01)
    for x in rng.uniform(0.01, 0.04, 200):
        b.report(x)
    light = b.current()
    assert 0.04 * 1.2 < light < 0.04 * 1.2 + 0.011
    for x in rng.uniform(0.05, 0.12, 200):          # the renderer got slower: the budget grows
        b.report(x)
    heavy = b.current()
    assert heavy > 0.12 and heavy > light
    for _ in range(200):                             # and shrinks back when it is fast again
        b.report(0.001)
    assert b.current() == pytest.approx(0.03)        # never below the floor
    for _ in range(200):
        b.report(5.0)
    assert b.current() == pytest.approx(0.5)         # nor above the ceiling


def test_no_frame_of_a_steady_load_misses_its_budget():
    """At a steady load the budget covers the lags it was measured on (what frames will meet)."""
    rng = np.random.default_rng(1)
    lags = rng.gamma(4.0, 0.01, 5000)               # a skewed, realistic lag distribution
    b = RenderBudget(window=1000, warmup=100)
    for x in lags[:1000]:
        b.report(x)
    budget = b.current()
    late = np.mean(lags[1000:] > budget)
    assert late < 0.005, late


def test_bad_bounds():
    with pytest.raises(ValueError):
        RenderBudget(floor=0.5, ceiling=0.1)
