#!/usr/bin/env python3
"""LayerNorm2d and Weight Standardization: normkit's Python functions against the torch
compositions models write today, in one process on the same tensors.

- ln2d: ConvNeXt's LayerNorm2d shapes (the four stages at batch 32), both memory formats;
  torch: x.permute(0, 2, 3, 1) -> F.layer_norm over C -> permute back (ConvNeXt's own code).
- ws: ResNet-50's distinct conv weight shapes; torch: timm's StdConv2d formula,
  (w - mean) / sqrt(var + eps) per output channel with torch.var_mean.

Ops: fwd (inference mode), bwd (torch: autograd's backward of a kept graph; normkit: its
*_backward from the forward's saved statistics), fwd+bwd. Each case: 2 warm-up calls, then
`--reps` timed ones; the median in ms, one CSV row per (impl, op, shape).

    /usr/bin/python3 bench/layer_norm2d_ws.py --threads 2 [--reps 7] [--quick]
"""
import argparse

import torch
import torch.nn.functional as F

import normkit

from py_timing import median_ms  # bench/py_timing.py, beside this script

LN2D_SHAPES = [(32, 96, 56, 56), (32, 192, 28, 28), (32, 384, 14, 14), (32, 768, 7, 7)]
WS_SHAPES = [(64, 3, 7, 7), (64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (128, 256, 1, 1),
             (128, 128, 3, 3), (512, 128, 1, 1), (256, 512, 1, 1), (256, 256, 3, 3),
             (1024, 256, 1, 1), (512, 1024, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1),
             (512, 2048, 1, 1), (2048, 1024, 1, 1)]
LN_EPS, WS_EPS = 1e-6, 1e-5


def ln2d_torch(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, LN_EPS).permute(0, 3, 1, 2)


def ws_torch(w):
    var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) / torch.sqrt(var + WS_EPS)


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
    normkit.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    print(f"# torch {torch.__version__}, {args.threads} threads, median of {args.reps}")
    print("impl,op,shape,format,ms")

    def report(impl, op, shape, fmt, fn):
        name = "x".join(map(str, shape))
        print(f"{impl},{op},{name},{fmt},{median_ms(fn, args.reps, warmup=2):.3f}", flush=True)

    for shape in LN2D_SHAPES[:1] if args.quick else LN2D_SHAPES:
        for fmt, memory_format in (("nchw", torch.contiguous_format),
                                   ("nhwc", torch.channels_last)):
            x = (torch.rand(shape, generator=gen) * 3.4 - 1.2).contiguous(memory_format=memory_format)
            dy = (torch.rand(shape, generator=gen) * 2 - 1).contiguous(memory_format=memory_format)
            w = torch.rand(shape[1], generator=gen) + 0.5
            b = torch.rand(shape[1], generator=gen) - 0.5
            for op, fn in zip(("ln2d.fwd", "ln2d.bwd", "ln2d.fwd+bwd"),
                              torch_ops(ln2d_torch, (x, w, b), dy)):
                report("torch", op, shape, fmt, fn)
            _, mean, rstd = normkit.layer_norm2d_forward(x, w, b, LN_EPS)

            def nk_bwd():
                normkit.layer_norm2d_backward(dy, x, mean, rstd, w)

            def nk_fwd_bwd():
                _, m, r = normkit.layer_norm2d_forward(x, w, b, LN_EPS)
                normkit.layer_norm2d_backward(dy, x, m, r, w)

            report("normkit", "ln2d.fwd", shape, fmt, lambda: normkit.layer_norm2d(x, w, b, LN_EPS))
            report("normkit", "ln2d.bwd", shape, fmt, nk_bwd)
            report("normkit", "ln2d.fwd+bwd", shape, fmt, nk_fwd_bwd)

    for shape in WS_SHAPES[:2] if args.quick else WS_SHAPES:
        w = torch.randn(shape, generator=gen) * 0.02
        g = torch.randn(shape, generator=gen)
        for op, fn in zip(("ws.fwd", "ws.bwd", "ws.fwd+bwd"), torch_ops(ws_torch, (w,), g)):
            report("torch", op, shape, "oihw", fn)
        _, mean, rstd = normkit.weight_standardization_forward(w, WS_EPS)

        def ws_fwd_bwd():
            _, m, r = normkit.weight_standardization_forward(w, WS_EPS)
            normkit.weight_standardization_backward(g, w, m, r)

        report("normkit", "ws.fwd", shape, "oihw", lambda: normkit.weight_standardization(w, WS_EPS))
        report("normkit", "ws.bwd", shape, "oihw",
               lambda: normkit.weight_standardization_backward(g, w, mean, rstd))
        report("normkit", "ws.fwd+bwd", shape, "oihw", ws_fwd_bwd)


if __name__ == "__main__":
    main()
