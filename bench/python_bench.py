#!/usr/bin/env python3
"""normkit's Python API (NumPy arrays in, new arrays out) against torch.nn.functional on the
same threads and the same bytes.

Each case is checked first (normkit's output against torch's, relative to max |torch|), then the
candidates are timed interleaved: every repetition times a sample of each (as many calls as take
--sample-ms at its warm speed), in a rotating order, and the median per call is reported. The
yardstick `copy` is numpy.copy of the input (one thread, a new array: the least any function
returning a new array of that size must do).

    PYTHONPATH=build/python python3 bench/python_bench.py [--threads 1,2] [--quick] [--sample-ms 2]
        [--csv FILE]

Any Python with NumPy, torch and normkit's module works: Debian's /usr/bin/python3 (torch 1.13)
or the venv of scripts/setup-anchors.sh (torch 2.x), which sees the system's site-packages.
"""
import argparse
import csv
import math
import os
import statistics
import sys
import time

import numpy as np


def import_normkit(build_dir):
    if build_dir:
        sys.path.insert(0, os.path.join(build_dir, "python"))
    import normkit  # noqa: E402  (after the path is known)
    return normkit


# (name, op, shape, extra, channels_last)
CASES = [
    ("bn.fwd_train", "bn_train", (32, 256, 14, 14), None, False),
    ("bn.fwd_train", "bn_train", (2, 64, 112, 112), None, True),
    ("bn.fwd_infer", "bn_eval", (2, 64, 112, 112), None, False),
    ("bn.fwd+bwd", "bn_train_bwd", (32, 256, 14, 14), None, False),
    ("gn.fwd", "gn", (1, 512, 64, 64), 32, False),
    ("gn.fwd", "gn", (1, 512, 64, 64), 32, True),
    ("gn.fwd", "gn", (2, 256, 100, 152), 32, True),
    ("gn.fwd+bwd", "gn_bwd", (1, 512, 64, 64), 32, False),
    ("gn.fwd+bwd", "gn_bwd", (2, 320, 64, 64), 32, True),
    ("in.fwd", "in", (2, 32, 16, 112, 112), None, False),
    ("ln.fwd", "ln", (4096, 768), None, False),
    ("ln.fwd", "ln", (2048, 4096), None, False),
]
QUICK = {0, 2, 4, 5, 7, 10}


def make_inputs(shape, channels_last, rng):
    """x and dy as NumPy arrays (channels-last strides when asked), weight and bias."""
    import torch

    x = torch.from_numpy(rng.uniform(-1.2, 2.2, size=shape).astype(np.float32))
    dy = torch.from_numpy(rng.uniform(-1.0, 1.0, size=shape).astype(np.float32))
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        dy = dy.contiguous(memory_format=fmt)
    params = shape[-1] if len(shape) == 2 else shape[1]
    w = rng.uniform(0.5, 1.5, size=params).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, size=params).astype(np.float32)
    return x.numpy(), dy.numpy(), w, b


def candidates(nk, op, x, dy, w, b, extra):
    """(normkit callable, torch callable): each returns its outputs as a tuple of arrays/tensors."""
    import torch
    import torch.nn.functional as F

    tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
    c = w.shape[0]
    rm0 = np.zeros(c, np.float32)
    rv0 = np.ones(c, np.float32)
    rm_nk, rv_nk = rm0.copy(), rv0.copy()
    rm_t, rv_t = torch.zeros(c), torch.ones(c)

    def grad_step(forward):
        txg = tx.detach().requires_grad_(True)
        twg = tw.detach().requires_grad_(True)
        tbg = tb.detach().requires_grad_(True)
        y = forward(txg, twg, tbg)
        return (y.detach(),) + torch.autograd.grad(y, (txg, twg, tbg), tdy)

    if op == "bn_train":
        def n():
            return (nk.batch_norm(x, rm_nk, rv_nk, w, b, training=True),)

        def t():
            with torch.no_grad():
                return (F.batch_norm(tx, rm_t, rv_t, tw, tb, training=True),)
    elif op == "bn_eval":
        rm_nk[:], rv_nk[:] = 0.25, 1.5
        rm_t[:], rv_t[:] = 0.25, 1.5

        def n():
            return (nk.batch_norm(x, rm_nk, rv_nk, w, b, training=False),)

        def t():
            with torch.no_grad():
                return (F.batch_norm(tx, rm_t, rv_t, tw, tb, training=False),)
    elif op == "bn_train_bwd":
        def n():
            y, mean, invstd = nk.batch_norm_forward(x, rm_nk, rv_nk, w, b, training=True)
            return (y,) + tuple(nk.batch_norm_backward(dy, x, w, mean, invstd, training=True))

        def t():
            return grad_step(lambda a, ww, bb: F.batch_norm(a, rm_t, rv_t, ww, bb, training=True))
    elif op == "gn":
        def n():
            return (nk.group_norm(x, extra, w, b),)

        def t():
            with torch.no_grad():
                return (F.group_norm(tx, extra, tw, tb),)
    elif op == "gn_bwd":
        def n():
            y, mean, rstd = nk.group_norm_forward(x, extra, w, b)
            return (y,) + tuple(nk.group_norm_backward(dy, x, mean, rstd, extra, w))

        def t():
            return grad_step(lambda a, ww, bb: F.group_norm(a, extra, ww, bb))
    elif op == "in":
        def n():
            return (nk.instance_norm(x, weight=w, bias=b),)

        def t():
            with torch.no_grad():
                return (F.instance_norm(tx, weight=tw, bias=tb),)
    elif op == "ln":
        cols = x.shape[-1]

        def n():
            return (nk.layer_norm(x, (cols,), w, b),)

        def t():
            with torch.no_grad():
                return (F.layer_norm(tx, (cols,), tw, tb),)
    else:
        raise ValueError(op)
    return n, t


def max_error(ours, theirs):
    worst = 0.0
    for a, b in zip(ours, theirs):
        b = b.numpy() if hasattr(b, "numpy") else b
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape or np.isnan(a).any() != np.isnan(b).any():
            return math.inf
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)))
    return worst


def warm_call_time(f):
    """Seconds one call of f takes when it follows calls of f: the median of three timed calls
    after an untimed one. A call after other work can take several times that here
    (bench/python_first_call.py), so one call, timed alone, would size samples too short, each
    led by such a slow call."""
    f()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(funcs, reps, min_sample=2e-3, budget=1.0):
    """Median seconds per call of each function, interleaved in a rotating order: a sample is
    as many calls as take about min_sample seconds at the function's warm speed."""
    calls, rep_time = [], 0.0
    for f in funcs:
        t = warm_call_time(f)
        calls.append(max(1, math.ceil(min_sample / max(t, 1e-9))))
        rep_time += calls[-1] * t
    reps = max(5, min(reps, int(budget / max(rep_time, 1e-9))))
    samples = [[] for _ in funcs]
    for r in range(reps):
        for k in range(len(funcs)):
            i = (k + r) % len(funcs)
            t0 = time.perf_counter()
            for _ in range(calls[i]):
                funcs[i]()
            samples[i].append((time.perf_counter() - t0) / calls[i])
    return [statistics.median(s) for s in samples]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}" if os.cpu_count() > 1 else "1")
    ap.add_argument("--build-dir", default=os.path.join(here, "..", "build"),
                    help="normkit's build folder (its python/ holds the module)")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--sample-ms", type=float, default=2.0,
                    help="least time of one sample of a candidate's calls")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv")
    args = ap.parse_args()
    if not args.sample_ms > 0:
        ap.error(f"--sample-ms must be positive, got {args.sample_ms}")

    import torch

    nk = import_normkit(args.build_dir)
    threads = sorted({int(t) for t in args.threads.split(",")})
    rng = np.random.default_rng(0)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, torch {torch.__version__}, "
          f"normkit from {os.path.dirname(nk.__file__)}")
    header = (f"{'op':13}{'shape':22}{'fmt':6}{'MB':>7}{'copy ms':>9}{'normkit':>9}{'torch':>9}"
              f"{'nk/copy':>9}{'vs torch':>10}  check")
    rows, failed = [], 0
    for t in threads:
        torch.set_num_threads(t)
        nk.set_num_threads(t)
        print(f"\n== {t} thread{'s' if t > 1 else ''}: median ms per call; copy = numpy.copy "
              f"(1 thread); vs torch = torch's time / normkit's ==\n{header}")
        speedups = []
        for i, (name, op, shape, extra, cl) in enumerate(CASES):
            if args.quick and i not in QUICK:
                continue
            x, dy, w, b = make_inputs(shape, cl, rng)
            n, tf = candidates(nk, op, x, dy, w, b, extra)
            err = max_error(n(), tf())
            ok = err <= 1e-3
            failed += not ok
            copy = lambda: np.copy(x)  # noqa: E731
            tc, tn, tt = measure([copy, n, tf], args.reps, args.sample_ms * 1e-3)
            speedups.append(tt / tn)
            fmt = "nhwc" if cl else "nchw" if len(shape) > 2 else "rows"
            mb = x.nbytes / 1e6
            check = "ok" if ok else f"MISMATCH {err:.1e}"
            print(f"{name:13}{'x'.join(map(str, shape)):22}{fmt:6}{mb:7.1f}{tc * 1e3:9.3f}"
                  f"{tn * 1e3:9.3f}{tt * 1e3:9.3f}{tn / tc:9.2f}{tt / tn:9.2f}x  {check}")
            if not ok:
                print(f"!!! MISMATCH: {name} {shape} {fmt}: max error {err:.3e}", file=sys.stderr)
            rows.append(dict(op=name, shape="x".join(map(str, shape)), format=fmt, threads=t,
                             mb=f"{mb:.2f}", copy_ms=f"{tc * 1e3:.4f}",
                             normkit_ms=f"{tn * 1e3:.4f}", torch_ms=f"{tt * 1e3:.4f}",
                             speedup_vs_torch=f"{tt / tn:.3f}", max_error=f"{err:.2e}"))
        if speedups:
            geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
            print(f"geometric mean speedup vs torch, {t} thread(s): {geo:.2f}x over "
                  f"{len(speedups)} cases")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nCSV: {args.csv}")
    print(f"\nchecks: {failed} mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
