#!/usr/bin/env python3
"""Whole-model step times: torch's norm layers against the same model after normkit.torch.convert.

Models: torchvision's ResNet-50 (BatchNorm2d; training step = forward, cross-entropy, backward,
SGD step) and a Stable-Diffusion-style stack of GroupNorm(32) + SiLU + conv3x3 blocks (training
step as above with a sum-of-products loss; inference = forward under no_grad). Both variants
start from the same weights; the first step's outputs are checked against each other before
anything is timed. The variants run interleaved (every repetition runs each once, in a rotating
order) and the median over repetitions is reported.

    OMP_NUM_THREADS=2 python bench/torch_models.py --model resnet50 --batch 2 --size 224 \\
        --memory-format channels_last --mode train --reps 5 --csv FILE
"""
import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch

import normkit.torch as nt


def sd_stack(channels=(320, 320, 640, 640)):
    layers, previous = [], channels[0]
    for c in channels:
        layers += [torch.nn.GroupNorm(32, previous), torch.nn.SiLU(),
                   torch.nn.Conv2d(previous, c, 3, padding=1)]
        previous = c
    return torch.nn.Sequential(*layers)


def make(model_name, memory_format):
    torch.manual_seed(0)
    if model_name == "resnet50":
        import torchvision
        model = torchvision.models.resnet50(num_classes=1000)
    else:
        model = sd_stack()
    return model.float().to(memory_format=memory_format)


def step_function(model, model_name, mode, x, target):
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                return model(x)
        return step
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        if model_name == "resnet50":
            loss = torch.nn.functional.cross_entropy(out, target)
        else:
            loss = (out * target).sum()
        loss.backward()
        optimizer.step()
        return out.detach()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["resnet50", "sd"], default="resnet50")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--memory-format", choices=["channels_first", "channels_last"],
                    default="channels_first")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", help="append a row per variant to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    nt._normkit.set_num_threads(args.threads)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    reference = make(args.model, fmt)
    converted = nt.convert(copy.deepcopy(reference))
    channels = 3 if args.model == "resnet50" else 320
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, channels, args.size, args.size, generator=g).contiguous(
        memory_format=fmt)
    if args.model == "resnet50":
        target = torch.randint(0, 1000, (args.batch,), generator=g)
    else:
        target = torch.randn(args.batch, 640, args.size, args.size, generator=g)
    steps = {"torch": step_function(reference, args.model, args.mode, x, target),
             "normkit": step_function(converted, args.model, args.mode, x, target)}

    # Check first (the same weights, so the first step's outputs agree), then time.
    first = {name: step() for name, step in steps.items()}
    error = ((first["normkit"].double() - first["torch"].double()).abs().max()
             / first["torch"].double().abs().max().clamp_min(1e-12)).item()
    load_before = os.getloadavg()
    samples = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.reps):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            t0 = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    median = {name: statistics.median(s) for name, s in samples.items()}
    label = (f"{args.model} {args.mode} batch {args.batch} {args.size}x{args.size} "
             f"{args.memory_format}")
    print(f"{label}: torch {median['torch'] * 1e3:.1f} ms, normkit {median['normkit'] * 1e3:.1f} "
          f"ms, torch/normkit {median['torch'] / median['normkit']:.3f}; first-step max "
          f"relative difference {error:.1e}; load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    if error > 1e-3:
        print(f"!!! outputs differ: {error:.3e}", file=sys.stderr)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["model", "mode", "batch", "size", "memory_format", "threads",
                            "variant", "median_ms", "min_ms", "max_ms", "reps", "samples_ms",
                            "first_step_rel_diff", "torch_version", "load1_before",
                            "load1_after"])
            for name in names:
                s = samples[name]
                w.writerow([args.model, args.mode, args.batch, args.size, args.memory_format,
                            args.threads, name, f"{median[name] * 1e3:.2f}",
                            f"{min(s) * 1e3:.2f}", f"{max(s) * 1e3:.2f}", len(s),
                            " ".join(f"{v * 1e3:.1f}" for v in s), f"{error:.2e}",
                            torch.__version__, f"{load_before[0]:.2f}", f"{load_after[0]:.2f}"])
    return 1 if error > 1e-3 else 0


if __name__ == "__main__":
    sys.exit(main())
