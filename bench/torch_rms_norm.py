#!/usr/bin/env python3
"""PyTorch's RMSNorm as LLaMA-style models compose it, x * rsqrt(mean(x^2, -1) + eps) * w,
timed on the shapes of normkit-bench's rms-norm set: the anchor for those cases when
normkit-bench is built without its libtorch anchors (torch 1.13 has no rms_norm kernel;
torch.nn.functional.rms_norm is timed too where it exists).

Ops as normkit-bench names them: fwd (inference mode), bwd (autograd's backward of a kept
graph: dx, dweight), fwd+bwd. Each case: 3 warm-up calls, then `--reps` timed ones; the median
is printed in ms, one CSV row per case.

    python3 bench/torch_rms_norm.py --threads 2 [--reps 21] [--quick]
"""
import argparse

import torch
import torch.nn.functional as F

from py_timing import median_ms  # bench/py_timing.py, beside this script

# bench/bench_case.cpp, rms-norm; --quick keeps the first.
SHAPES = [(2048, 4096), (512, 5120), (4096, 768), (1001, 3001)]
EPS = 1e-5


def composed(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    shapes = SHAPES[:1] if args.quick else SHAPES
    forms = [("composed", composed)]
    if hasattr(F, "rms_norm"):
        forms.append(("F.rms_norm", lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)))
    print(f"# torch {torch.__version__}, {args.threads} threads, median of {args.reps}")
    print("form,op,shape,ms")
    for shape in shapes:
        x = torch.rand(shape, generator=gen) * 3.4 - 1.2
        dy = torch.rand(shape, generator=gen) * 2 - 1
        w = torch.rand(shape[-1], generator=gen) + 0.5
        for form, forward in forms:
            def fwd():
                with torch.inference_mode():
                    forward(x, w)

            xg, wg = (t.detach().requires_grad_(True) for t in (x, w))
            graph = forward(xg, wg)

            def bwd():
                torch.autograd.grad([graph], [xg, wg], [dy], retain_graph=True)

            def fwd_bwd():
                torch.autograd.grad([forward(xg, wg)], [xg, wg], [dy])

            name = "x".join(map(str, shape))
            for op, fn in (("rms.fwd", fwd), ("rms.bwd", bwd), ("rms.fwd+bwd", fwd_bwd)):
                print(f"{form},{op},{name},{median_ms(fn, args.reps):.3f}", flush=True)
            del graph


if __name__ == "__main__":
    main()
