"""Tests for jaxdec.tools.timing, on a fake clock: each timed span ends when the result is ready
(not when the call returns), the first call is untimed, and the statistic is the median or the
fastest of exactly `repeats` calls."""

from __future__ import annotations

import pytest

from jaxdec.tools import timing


class Clock:
    """A perf_counter that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Pending:
    """A result that is ready only after `seconds` more: as JAX's async dispatch returns arrays
    before they are computed. `jax.block_until_ready` calls its method."""

    def __init__(self, clock: Clock, seconds: float, value: int):
        self.clock, self.seconds, self.value, self.waited = clock, seconds, value, False

    def block_until_ready(self):
        self.clock.now += self.seconds
        self.waited = True
        return self


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def _calls(clock: Clock, durations: list[float]):
    """fn() returning at once, its result ready durations[i] later; and the results it made."""
    made = []

    def fn():
        clock.now += 0.001  # dispatch: returns before the work is done
        made.append(Pending(clock, durations[len(made)], len(made)))
        return made[-1]

    return fn, made


@pytest.mark.parametrize("statistic, expected", [("median", 3.0), ("fastest", 1.0)])
def test_measure_times_each_call_until_its_result_is_ready(clock, statistic, expected):
    fn, made = _calls(clock, [50.0, 3.0, 1.0, 7.0, 2.0, 4.0])
    t = timing.measure(fn, 5, statistic=statistic)
    assert len(made) == 6 and all(r.waited for r in made)
    assert t.times == pytest.approx((3.001, 1.001, 7.001, 2.001, 4.001))
    assert t.seconds == pytest.approx(expected + 0.001)
    assert t.warmup_seconds == pytest.approx(50.001)  # the first call, not among the timed ones
    assert t.compile_seconds == pytest.approx(50.001 - t.seconds)
    assert t.result is None


def test_measure_keeps_the_first_result_only_when_asked(clock):
    fn, made = _calls(clock, [1.0, 2.0, 3.0])
    assert timing.measure(fn, 2, keep_result=True).result is made[0]


def test_timed_returns_the_ready_result_and_its_seconds(clock):
    fn, made = _calls(clock, [2.5])
    result, seconds = timing.timed(fn)
    assert result is made[0] and result.waited and seconds == pytest.approx(2.501)


@pytest.mark.parametrize("kwargs, message", [
    (dict(repeats=0), "repeats must be an int >= 1, got 0"),
    (dict(repeats=2.0), "repeats must be an int >= 1"),
    (dict(repeats=2, statistic="mean"), "statistic must be 'median' or 'fastest', got 'mean'"),
])
def test_bad_arguments_are_refused_before_any_call(clock, kwargs, message):
    fn, made = _calls(clock, [1.0] * 4)
    with pytest.raises(ValueError, match=message):
        timing.measure(fn, **kwargs)
    assert made == []


def test_stopwatch_laps_are_consecutive_windows(clock):
    watch = timing.Stopwatch()
    clock.now += 2.0
    assert watch.lap() == pytest.approx(2.0)
    clock.now += 0.5
    assert watch.lap() == pytest.approx(0.5)  # from the previous lap, not from the start
