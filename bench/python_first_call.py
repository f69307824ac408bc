#!/usr/bin/env python3
"""What a call costs depending on what ran just before it: normkit's and torch's channels-last
GroupNorm forward (1x512x64x64, 32 groups, 2 threads, the op benchmark's case) timed right after
another call of itself (back to back), after the cores sat idle for 1 ms and 5 ms, after 5 ms of
one core spinning (no memory traffic), after 5 ms idle and a read of the input, after a 64 MB
write on one core, and after three calls of the other library. The op benchmark
(python_bench.py) rotates between the copy, normkit and torch in samples of about 2 ms, so each
sample's first call follows the others. Medians of 150 timed calls per cell. Run from outside
the checkout so the installed normkit is used.

    cd /tmp && OMP_NUM_THREADS=2 PYTHON bench/python_first_call.py
"""
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import normkit
from python_bench import make_inputs  # bench/python_bench.py, beside this script


def main():
    torch.set_num_threads(2)
    normkit.set_num_threads(2)
    xn, _, w, b = make_inputs((1, 512, 64, 64), True, np.random.default_rng(0))
    x, tw, tb = (torch.from_numpy(a) for a in (xn, w, b))
    calls = {"normkit": lambda: normkit.group_norm(xn, 32, w, b),
             "torch": lambda: F.group_norm(x, 32, tw, tb)}
    other = {"normkit": "torch", "torch": "normkit"}
    scratch = np.zeros(64 << 20, np.uint8)

    def spin(seconds):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            pass

    before = {
        "back to back": lambda name: calls[name](),
        "after 1 ms idle": lambda name: (calls[name](), time.sleep(1e-3)),
        "after 5 ms idle": lambda name: (calls[name](), time.sleep(5e-3)),
        "after 5 ms spinning": lambda name: (calls[name](), spin(5e-3)),
        "after 5 ms idle, x read": lambda name: (calls[name](), time.sleep(5e-3), xn.sum()),
        "after a 64 MB write": lambda name: (calls[name](), scratch.fill(1)),
        "after 3 calls of the other": lambda name: [calls[other[name]]() for _ in range(3)],
    }
    print(f"torch {torch.__version__}, normkit from {normkit.__file__}")
    print(f"{'ms per call, median of 150':30}{'normkit':>10}{'torch':>10}")
    for label, prepare in before.items():
        row = []
        for name in ("normkit", "torch"):
            times = []
            for _ in range(150):
                prepare(name)
                start = time.perf_counter()
                calls[name]()
                times.append((time.perf_counter() - start) * 1e3)
            row.append(statistics.median(times))
        print(f"{label:30}{row[0]:10.3f}{row[1]:10.3f}")


if __name__ == "__main__":
    main()
