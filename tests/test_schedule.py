"""The warmup + cosine learning-rate schedule."""

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from albor.schedule import lr_at


def lr(step, lr_max=1e-3, lr_min=1e-5, warmup=10, total=100):
    return lr_at(step, lr_max=lr_max, lr_min=lr_min, warmup_steps=warmup, total_steps=total)


def test_lr_schedule_warmup_cosine_boundaries():
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(5e-4)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # cosine midpoint
    assert lr(100) == pytest.approx(1e-5)
    assert lr(10_000) == 1e-5


def test_no_warmup_starts_at_peak():
    assert lr(0, warmup=0) == pytest.approx(1e-3)


def test_warmup_equal_total_ends_at_min():
    assert lr(9, warmup=10, total=10) == pytest.approx(9e-4)
    assert lr(10, warmup=10, total=10) == 1e-5


schedules = st.tuples(
    st.floats(min_value=1e-7, max_value=1.0),  # lr_max
    st.floats(min_value=0.0, max_value=1.0),  # lr_min as a fraction of lr_max
    st.integers(min_value=1, max_value=5000),  # warmup
    st.integers(min_value=1, max_value=5000),  # decay steps
)


@given(schedules, st.integers(min_value=0, max_value=20_000))
def test_never_above_lr_max_and_never_below_zero(s, step):
    lr_max, frac, warmup, decay = s
    value = lr(step, lr_max, lr_max * frac, warmup, warmup + decay)
    assert 0.0 <= value <= lr_max * (1 + 1e-12)


@given(schedules, st.integers(min_value=0, max_value=1000))
def test_equal_to_lr_min_after_total_steps(s, extra):
    lr_max, frac, warmup, decay = s
    total = warmup + decay
    assert lr(total + extra, lr_max, lr_max * frac, warmup, total) == lr_max * frac


@given(schedules)
def test_continuous_at_warmup_boundary(s):
    lr_max, frac, warmup, decay = s
    assume(decay >= 2)
    total = warmup + decay
    before, at, after = (lr(k, lr_max, lr_max * frac, warmup, total) for k in (warmup - 1, warmup, warmup + 1))
    assert at == pytest.approx(lr_max)
    # One step of warmup on one side, one step of cosine on the other: both jumps are small.
    assert at - before == pytest.approx(lr_max / warmup)
    assert 0.0 <= at - after <= (lr_max - lr_max * frac) * (1 - math.cos(math.pi / decay)) / 2 + 1e-15


@given(schedules)
def test_monotone_in_each_phase(s):
    lr_max, frac, warmup, decay = s
    total = warmup + decay
    values = [lr(k, lr_max, lr_max * frac, warmup, total) for k in range(0, total + 2, max(1, total // 50))]
    peak = max(range(len(values)), key=values.__getitem__)
    assert all(a <= b + 1e-18 for a, b in zip(values[: peak + 1], values[1 : peak + 1]))
    assert all(a >= b - 1e-18 for a, b in zip(values[peak:], values[peak + 1 :]))
