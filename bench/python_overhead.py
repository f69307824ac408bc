#!/usr/bin/env python3
"""Per-call overhead of the Python module: batch_norm_forward (training) on a 2x3 float32 tensor,
where the kernel's work is a few nanoseconds and what is timed is the binding (argument
conversion, checks, output allocation, the return), and get_num_threads, a call with no
arguments. The same calls through torch (F.batch_norm, torch.native_batch_norm,
torch.get_num_threads) give the yardstick of torch's own dispatch.

All candidates run in one process, one thread each, interleaved: every repetition times each
candidate over `--number` calls, in a rotating order; the median over repetitions is reported
in microseconds per call, of the thread's CPU time (time.thread_time: what the call costs,
whatever else the machine runs) and of wall time. --module NAME adds a module with the same batch_norm_forward and
get_num_threads (e.g. a prototype built on another binding library), importable from PYTHONPATH.

    PYTHONPATH=build/python /usr/bin/python3 bench/python_overhead.py [--module nbproto]
"""
import argparse
import importlib
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import normkit


def candidates(modules):
    x_np = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    x_torch = torch.from_numpy(x_np.copy())
    cases = []
    for name, m in modules:
        cases += [
            (f"{name}: batch_norm_forward, NumPy 2x3",
             lambda m=m: m.batch_norm_forward(x_np, None, None, None, None, True, 0.1, 1e-5)),
            (f"{name}: batch_norm_forward, torch 2x3",
             lambda m=m: m.batch_norm_forward(x_torch, None, None, None, None, True, 0.1, 1e-5)),
            (f"{name}: get_num_threads()", m.get_num_threads),
        ]
    cases += [
        ("torch: F.batch_norm(training=True), 2x3",
         lambda: F.batch_norm(x_torch, None, None, None, None, True, 0.1, 1e-5)),
        ("torch: torch.native_batch_norm, 2x3",
         lambda: torch.native_batch_norm(x_torch, None, None, None, None, True, 0.1, 1e-5)),
        ("torch: torch.get_num_threads()", torch.get_num_threads),
    ]
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", default=[],
                        help="another module with batch_norm_forward and get_num_threads")
    parser.add_argument("--number", type=int, default=2000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=201, help="timings per candidate")
    args = parser.parse_args()

    torch.set_num_threads(1)
    normkit.set_num_threads(1)
    modules = [("normkit (pybind11)", normkit)]
    modules += [(name, importlib.import_module(name)) for name in args.module]
    cases = candidates(modules)
    for _, call in cases:  # warm up: first-call imports and allocations
        for _ in range(100):
            call()
    cpu = {name: [] for name, _ in cases}
    wall = {name: [] for name, _ in cases}
    for r in range(args.repeat):
        for i in range(len(cases)):
            name, call = cases[(i + r) % len(cases)]
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            for _ in range(args.number):
                call()
            cpu[name].append((time.thread_time() - start_cpu) / args.number)
            wall[name].append((time.perf_counter() - start_wall) / args.number)
    print("| call | CPU us/call (median) | p10-p90 | wall us/call (median) |")
    print("|---|---:|---:|---:|")
    for name, _ in cases:
        q = statistics.quantiles(cpu[name], n=10)
        print(f"| {name} | {1e6 * statistics.median(cpu[name]):.2f} | "
              f"{1e6 * q[0]:.2f}-{1e6 * q[-1]:.2f} | {1e6 * statistics.median(wall[name]):.2f} |")


if __name__ == "__main__":
    main()
