"""Timing shared by the Python benchmark scripts in bench/: the median of `reps` timed calls
after `warmup` untimed ones (first-call costs: allocation, thread-pool start-up, caches)."""
import statistics
import time


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
