"""Timing JAX work: the one helper every tool times with.

JAX dispatches asynchronously, so a call is timed up to `jax.block_until_ready` of its result.
The first call of a jitted function compiles: `measure` makes that call untimed (its seconds are
kept as `warmup_seconds`), then times `repeats` more and keeps their median (the benchmarks: a
typical run) or the fastest (the explain report: the run least disturbed by other work on the
machine, as `timeit` advises). `timed` is one call of it, for code that times calls inside its
own loop (a stepped decode); `Stopwatch` times windows of work between two reads (the train
loop's tokens/s).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Literal

import jax


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn()'s result, waited for with `jax.block_until_ready`, and the wall seconds of the call."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Timing:
    """What `measure` found.

    Attributes:
      seconds: the median (or the fastest) of the timed calls.
      times: every timed call's seconds, in order.
      warmup_seconds: the untimed first call's seconds (compilation, if any, plus one run).
      result: the first call's result with keep_result=True, else None.
    """

    seconds: float
    times: tuple[float, ...]
    warmup_seconds: float
    result: Any = None

    @property
    def compile_seconds(self) -> float:
        """The first call's seconds less a timed call's: what compiling added."""
        return self.warmup_seconds - self.seconds


def measure(fn: Callable[[], Any], repeats: int, *, statistic: Literal["median", "fastest"] = "median",
            keep_result: bool = False) -> Timing:
    """Calls fn() once untimed, then `repeats` times timed; `statistic` picks the figure.

    keep_result: keep the first call's result (tokens to compare, say). Off by default, so no
    result stays alive while the timed calls run (a kept cache would change what allocating the
    next one costs).
    """
    if statistic not in ("median", "fastest"):
        raise ValueError(f"statistic must be 'median' or 'fastest', got {statistic!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    result, warmup = timed(fn)
    if not keep_result:
        result = None
    times = tuple(timed(fn)[1] for _ in range(repeats))
    seconds = statistics.median(times) if statistic == "median" else min(times)
    return Timing(seconds, times, warmup, result)


class Stopwatch:
    """Wall seconds of consecutive windows, from its creation or the last `lap` to the next.

    It times what the caller has waited for: read the window's results (or block on them)
    before calling `lap`.
    """

    def __init__(self):
        self._start = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last lap (or creation); starts the next window now."""
        now = time.perf_counter()
        seconds, self._start = now - self._start, now
        return seconds
