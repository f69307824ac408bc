#!/usr/bin/env python3
"""PyTorch's Batch Renorm as training code composes it (torch has no kernel: batch statistics,
r and d detached, the corrected affine, the running statistics updated in place), beside
F.batch_norm in training mode, on the shapes of normkit-bench's batch-renorm set.

Ops as normkit-bench names them: fwd_train, bwd (autograd's backward of a kept graph: dx,
dweight, dbias), fwd+bwd. Each case: 3 warm-up calls, then `--reps` timed ones; the median is
printed in ms, one CSV row per case.

    python3 bench/torch_batch_renorm.py --threads 2 [--reps 21] [--quick] [--channels-last]
"""
import argparse

import torch
import torch.nn.functional as F

from py_timing import median_ms  # bench/py_timing.py, beside this script

# bench/bench_case.cpp, resnet50(32); --quick keeps its quick shapes (indices 3 and 8).
SHAPES = [(32, c, h, h) for c, h in ((64, 112), (64, 56), (256, 56), (128, 28), (512, 28),
                                     (256, 14), (1024, 14), (512, 7), (2048, 7))]
EPS, MOMENTUM, R_MAX, D_MAX = 1e-5, 0.01, 3.0, 5.0


def batch_renorm(x, rm, rv, w, b):
    dims = [0, 2, 3]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    sigma = torch.sqrt(var + EPS)
    sigma_run = torch.sqrt(rv + EPS).view(1, -1, 1, 1)
    r = (sigma / sigma_run).clamp(1 / R_MAX, R_MAX).detach()
    d = ((mean - rm.view(1, -1, 1, 1)) / sigma_run).clamp(-D_MAX, D_MAX).detach()
    with torch.no_grad():
        n = x.numel() // x.shape[1]
        rm.mul_(1 - MOMENTUM).add_(MOMENTUM * mean.flatten())
        rv.mul_(1 - MOMENTUM).add_(MOMENTUM * var.flatten() * n / (n - 1))
    y = (x - mean) / sigma * r + d
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    shapes = [SHAPES[3], SHAPES[8]] if args.quick else SHAPES
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    forms = [("composed-brn", batch_renorm),
             ("F.batch_norm", lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True,
                                                                   MOMENTUM, EPS))]
    print(f"# torch {torch.__version__}, {args.threads} threads, median of {args.reps}, "
          f"{'nhwc' if args.channels_last else 'nchw'}")
    print("form,op,shape,ms")
    for shape in shapes:
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        c = shape[1]
        w, b = torch.rand(c, generator=gen) + 0.5, torch.rand(c, generator=gen) - 0.5
        rm, rv = torch.zeros(c), torch.ones(c)
        for form, forward in forms:
            def fwd():
                with torch.no_grad():
                    forward(x, rm, rv, w, b)

            xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))
            graph = forward(xg, rm, rv, wg, bg)

            def bwd():
                torch.autograd.grad([graph], [xg, wg, bg], [dy], retain_graph=True)

            def fwd_bwd():
                torch.autograd.grad([forward(xg, rm, rv, wg, bg)], [xg, wg, bg], [dy])

            name = "x".join(map(str, shape))
            for op, fn in (("fwd_train", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
                print(f"{form},{op},{name},{median_ms(fn, args.reps):.3f}", flush=True)
            del graph


if __name__ == "__main__":
    main()
