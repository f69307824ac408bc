#!/usr/bin/env python3
"""PyTorch compositions of FRN + TLU and EvoNorm-S0 (torch has no kernel for either), timed on
the shapes of normkit-bench's frn and evonorm-s0 sets: the anchor for those cases.

- frn: the FRN paper's code, nu2 = x.pow(2).mean((2, 3), keepdim=True),
  max(x * rsqrt(nu2 + eps) * w + b, tau).
- evo: EvoNorm-S0 as timm writes it, x * sigmoid(v * x) / group_std(x) * w + b, with the group
  std from torch.var_mean over (C/G, H, W) (G = 32).

Ops as normkit-bench names them: fwd (inference mode), bwd (autograd's backward of a kept graph:
dx and every parameter's gradient), fwd+bwd; both memory formats, float32. Each case: 2 warm-up
calls, then `--reps` timed ones; the median in ms, one CSV row per case.

    /usr/bin/python3 bench/torch_frn_evonorm.py --threads 2 [--reps 7] [--quick]
"""
import argparse

import torch

from py_timing import median_ms  # bench/py_timing.py, beside this script

# bench/bench_case.cpp, frn and evonorm-s0: ResNet-50's activation sizes at batch 32; --quick
# keeps the same two as normkit-bench's --quick.
RESNET50 = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14),
            (512, 7), (2048, 7)]
SHAPES = [(32, c, s, s) for c, s in RESNET50]
QUICK = [3, 8]
FRN_EPS, EVO_EPS, GROUPS = 1e-6, 1e-5, 32


def frn(x, w, b, tau):
    nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
    y = x * torch.rsqrt(nu2 + FRN_EPS) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    return torch.max(y, tau.view(1, -1, 1, 1))


def group_std(x):
    n, c, h, w = x.shape
    var = torch.var_mean(x.reshape(n, GROUPS, c // GROUPS, h, w), dim=(2, 3, 4), unbiased=False,
                         keepdim=True)[0]
    return (var + EVO_EPS).sqrt().expand(n, GROUPS, c // GROUPS, h, w).reshape(n, c, h, w)


def evonorm_s0(x, v, w, b):
    view = (1, -1, 1, 1)
    return x * torch.sigmoid(v.view(view) * x) / group_std(x) * w.view(view) + b.view(view)


def torch_ops(forward, inputs, dy):
    def fwd():
        with torch.inference_mode():
            forward(*inputs)

    grads = [t.detach().requires_grad_(True) for t in inputs]
    graph = forward(*grads)

    def bwd():
        torch.autograd.grad([graph], grads, [dy], retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad([forward(*grads)], grads, [dy])

    return fwd, bwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    print(f"# torch {torch.__version__}, {args.threads} threads, median of {args.reps}")
    print("impl,op,shape,format,ms")
    shapes = [SHAPES[i] for i in QUICK] if args.quick else SHAPES
    for shape in shapes:
        c = shape[1]
        for fmt, memory_format in (("nchw", torch.contiguous_format),
                                   ("nhwc", torch.channels_last)):
            x = (torch.rand(shape, generator=gen) * 3.4 - 1.2).contiguous(memory_format=memory_format)
            dy = (torch.rand(shape, generator=gen) * 2 - 1).contiguous(memory_format=memory_format)
            w = torch.rand(c, generator=gen) + 0.5
            b = torch.rand(c, generator=gen) - 0.5
            tau = torch.rand(c, generator=gen) - 0.5
            v = torch.rand(c, generator=gen) + 0.5
            name = "x".join(map(str, shape))
            for family, forward, inputs in (("frn", frn, (x, w, b, tau)),
                                            ("evo", evonorm_s0, (x, v, w, b))):
                ops = (f"{family}.fwd", f"{family}.bwd", f"{family}.fwd+bwd")
                # normkit-bench's shape names: EvoNorm-S0's with its groups
                label = f"{name}/g{GROUPS}" if family == "evo" else name
                for op, fn in zip(ops, torch_ops(forward, inputs, dy)):
                    print(f"torch,{op},{label},{fmt},{median_ms(fn, args.reps, warmup=2):.3f}", flush=True)


if __name__ == "__main__":
    main()
