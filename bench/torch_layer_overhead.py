#!/usr/bin/env python3
"""The fixed cost of a converted layer: torch's BatchNorm2d against normkit.torch's, forward, sum
and backward, on a tiny input (where the cost is all overhead) and on a ResNet-50-sized one; and
one forward op called through the torch.library custom op against the extension directly.
Medians of 7 timings; 2 threads. Run from outside the checkout so the installed normkit is used.

    cd /tmp && OMP_NUM_THREADS=2 PYTHON bench/torch_layer_overhead.py
"""
import torch

import normkit.torch as nt
from normkit import _normkit
from py_timing import median_ms  # bench/py_timing.py, beside this script


def median_us(call, number, repeats=7):
    """Per call: the median of `repeats` timings of `number` calls each (tiny calls are far
    below the timer's resolution one at a time)."""
    def calls():
        for _ in range(number):
            call()
    return median_ms(calls, repeats, warmup=1) * 1e3 / number


def main():
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, custom ops: {nt.CUSTOM_OPS}")
    for shape, number in (((2, 4, 1, 1), 2000), ((2, 64, 56, 56), 200)):
        x = torch.randn(*shape, requires_grad=True)
        layers = {"torch": torch.nn.BatchNorm2d(shape[1]),
                  "normkit": nt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(shape[1])))}
        for name, layer in layers.items():
            us = median_us(lambda: layer(x).sum().backward(), number)
            print(f"{'x'.join(map(str, shape)):>12} {name:>8}: {us:8.1f} us per forward+sum+backward")
    x, w, b = torch.randn(2, 4, 1, 1), torch.ones(4), torch.zeros(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    calls = {"extension": _normkit.batch_norm_forward}
    if nt.CUSTOM_OPS:
        calls["custom op"] = nt._ops.batch_norm_forward
    for name, op in calls.items():
        us = median_us(lambda: op(x, rm, rv, w, b, True, 0.1, 1e-5), 5000)
        print(f"batch_norm_forward 2x4x1x1 via {name}: {us:.1f} us per call")


if __name__ == "__main__":
    main()
