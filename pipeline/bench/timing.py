"""The one timing rule of the benchmarks: median wall seconds of repeated calls after warm-up calls."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_median_seconds(steps: dict[str, Callable[[], None]], repeats: int,
                               warmup: int) -> dict[str, float]:
    """{name: median seconds} of `repeats` timed calls of each step after `warmup` untimed rounds (allocator,
    thread pools, lazy initialisation). Each round calls every step once, in turn, so a slow spell of the
    machine (another tenant, clock changes) hits a path and the peer it is compared with alike; every other
    round runs them in reverse, so neither always runs after the other. CUDA callers synchronise inside each
    step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats):
        order = list(steps.items())
        for name, step in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def median_seconds(step: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median seconds of `repeats` timed calls of `step` after `warmup` untimed ones."""
    return interleaved_median_seconds({"step": step}, repeats, warmup)["step"]
