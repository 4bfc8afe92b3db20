"""``models.delivery.retry_delay``: the schedule, its end, Retry-After bounds and jitter."""

from __future__ import annotations

import random

import pytest

from models.attempts import retry_delay

SCHEDULE = [5.0, 300.0, 1800.0]


@pytest.mark.parametrize(("attempt", "expected"), [(1, 5.0), (2, 300.0), (3, 1800.0)])
def test_each_failed_attempt_waits_its_step(attempt, expected):
    assert retry_delay(SCHEDULE, attempt, None, 0.0) == expected


@pytest.mark.parametrize("attempt", [4, 5, 100])
def test_a_spent_schedule_means_no_more_attempts(attempt):
    assert retry_delay(SCHEDULE, attempt, None, 0.0) is None
    assert retry_delay(SCHEDULE, attempt, 10.0, 0.5) is None


def test_an_empty_schedule_allows_no_retry():
    assert retry_delay([], 1, None, 0.0) is None


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [
        (1, 7.0, 7.0),  # longer than the step: honoured
        (1, 0.0, 5.0),  # never sooner than the step
        (1, 2.0, 5.0),
        (2, 7.0, 300.0),
        (1, 1800.0, 1800.0),  # exactly the longest step
        (1, 3600.0, 1800.0),  # never later than the schedule's longest step
        (3, 10_000_000.0, 1800.0),
    ],
)
def test_retry_after_is_honoured_within_the_schedule(attempt, retry_after, expected):
    assert retry_delay(SCHEDULE, attempt, retry_after, 0.0) == expected


def test_jitter_stays_within_its_fraction_of_the_step():
    random.seed(1234)
    delays = [retry_delay([100.0, 200.0], 1, None, 0.1) for _ in range(500)]
    assert all(d is not None and 90.0 <= d <= 110.0 for d in delays), delays
    values = [d for d in delays if d is not None]
    # Really spread over the band, on both sides of the step.
    assert min(values) < 95.0
    assert max(values) > 105.0
    later = [retry_delay([100.0, 200.0], 2, None, 0.25) for _ in range(500)]
    assert all(d is not None and 150.0 <= d <= 250.0 for d in later)


def test_jitter_never_brings_a_retry_before_retry_after():
    """Retry-After is a floor: jitter must not send the retry before the receiver asked."""
    random.seed(99)
    for _ in range(500):
        assert retry_delay(SCHEDULE, 1, 60.0, 0.2) == 60.0
        assert retry_delay(SCHEDULE, 1, 99_999.0, 0.2) == 1800.0
        shorter = retry_delay(SCHEDULE, 1, 2.0, 0.2)  # shorter than the step: the step, jittered
        assert shorter is not None
        assert 4.0 <= shorter <= 6.0
