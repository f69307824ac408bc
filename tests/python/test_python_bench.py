"""bench/python_bench.py's timing loop, on a fake clock: a sample holds as many calls as take
--sample-ms at a function's warm speed, however slow its first call was."""

import importlib.util
import math
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "python_bench.py")


@pytest.fixture
def bench(monkeypatch):
    """The benchmark module, with time.perf_counter replaced by a clock only the fake
    functions advance."""
    spec = importlib.util.spec_from_file_location("python_bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clock = {"now": 0.0}
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock["now"])
    module.clock = clock
    return module


def fake(clock, first, warm):
    """A function whose first call takes `first` seconds and every later one `warm`; its
    calls are counted in .calls."""
    def f():
        f.calls += 1
        clock["now"] += first if f.calls == 1 else warm
    f.calls = 0
    return f


def test_warm_call_time_ignores_a_slow_first_call(bench):
    f = fake(bench.clock, first=10e-3, warm=0.25e-3)
    assert bench.warm_call_time(f) == pytest.approx(0.25e-3)
    assert f.calls == 4  # one untimed, three timed


@pytest.mark.parametrize("sample_ms", [2.0, 10.0])
def test_samples_last_the_sample_time_at_warm_speed(bench, sample_ms):
    # Warm times that do not divide the sample, so the clock's rounding cannot move a count.
    f = fake(bench.clock, first=10e-3, warm=0.3e-3)
    g = fake(bench.clock, first=1e-3, warm=0.45e-3)
    reps = 7
    tf, tg = bench.measure([f, g], reps, min_sample=sample_ms * 1e-3)
    assert tf == pytest.approx(0.3e-3)
    assert tg == pytest.approx(0.45e-3)
    # 4 calls to size the samples, then reps samples of ceil(sample / warm) calls each.
    assert f.calls == 4 + reps * math.ceil(sample_ms / 0.3)
    assert g.calls == 4 + reps * math.ceil(sample_ms / 0.45)


def test_a_call_longer_than_the_sample_is_a_sample_alone(bench):
    f = fake(bench.clock, first=5e-3, warm=3e-3)
    (t,) = bench.measure([f], 5, min_sample=2e-3)
    assert t == pytest.approx(3e-3)
    assert f.calls == 4 + 5
