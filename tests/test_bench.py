"""The benchmarks' timing rule."""
from __future__ import annotations

import pipeline.bench.timing as timing


def test_interleaved_timing_alternates_steps_and_takes_each_median(monkeypatch):
    """Warm-up rounds are untimed; each round calls every step once, in turn, reversed every other round; each
    step gets the median of its own calls (a fake clock: step a takes 1, 5, 2 s, step b 10 s each time)."""
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    calls = []
    a_seconds = iter([100.0, 1.0, 5.0, 2.0])  # the first is the warm-up round

    def a():
        calls.append("a")
        clock[0] += next(a_seconds)

    def b():
        calls.append("b")
        clock[0] += 10.0

    assert timing.interleaved_median_seconds({"a": a, "b": b}, repeats=3, warmup=1) == {"a": 2.0, "b": 10.0}
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
