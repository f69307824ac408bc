#!/usr/bin/env python3
"""PyTorch's GroupNorm + SiLU, as a diffusion UNet runs it (F.group_norm, then F.silu), timed
on the shapes of normkit-bench's sd-unet-gn-silu set: the anchor for those cases when
normkit-bench is built without its libtorch anchors.

Ops as normkit-bench names them: fwd (inference mode), bwd (autograd's backward of a kept
graph: dx, dweight, dbias), fwd+bwd. Each case: 3 warm-up calls, then `--reps` timed ones; the
median is printed in ms, one CSV row per case.

    python3 bench/torch_group_norm_silu.py --threads 2 [--reps 21] [--quick]
"""
import argparse

import torch
import torch.nn.functional as F

from py_timing import median_ms  # bench/py_timing.py, beside this script

# bench/bench_case.cpp, sd-unet-gn-silu (G = 32); --quick keeps the indices 2 and 6.
SHAPES = [(1, 128, 256, 256), (1, 256, 128, 128), (1, 512, 64, 64), (1, 512, 32, 32),
          (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1920, 32, 32),
          (2, 2560, 16, 16)]
GROUPS, EPS = 32, 1e-5


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    shapes = [SHAPES[i] for i in (2, 6)] if args.quick else SHAPES
    print(f"# torch {torch.__version__}, {args.threads} threads, median of {args.reps}")
    print("op,shape,format,ms")
    for shape in shapes:
        for fmt in ("nchw", "nhwc"):
            mf = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
            x = (torch.rand(shape, generator=gen) * 3.4 - 1.2).contiguous(memory_format=mf)
            dy = (torch.rand(shape, generator=gen) * 2 - 1).contiguous(memory_format=mf)
            w = torch.rand(shape[1], generator=gen) + 0.5
            b = torch.rand(shape[1], generator=gen) - 0.5

            def forward(x_, w_, b_):
                return F.silu(F.group_norm(x_, GROUPS, w_, b_, EPS))

            def fwd():
                with torch.inference_mode():
                    forward(x, w, b)

            xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))
            graph = forward(xg, wg, bg)

            def bwd():
                torch.autograd.grad([graph], [xg, wg, bg], [dy], retain_graph=True)

            def fwd_bwd():
                y = forward(xg, wg, bg)
                torch.autograd.grad([y], [xg, wg, bg], [dy])

            name = "x".join(map(str, shape)) + f"/g{GROUPS}"
            for op, fn in (("gn+silu.fwd", fwd), ("gn+silu.bwd", bwd),
                           ("gn+silu.fwd+bwd", fwd_bwd)):
                print(f"{op},{name},{fmt},{median_ms(fn, args.reps):.3f}", flush=True)
            del graph


if __name__ == "__main__":
    main()
