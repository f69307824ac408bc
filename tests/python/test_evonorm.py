"""evonorm_s0, its forward and backward against a float64 NumPy reference, the formula composed
of torch ops in float64 (timm's EvoNorm2dS0; autograd for the gradients, through the group
statistics), and finite differences; every layout and dtype, thread-count determinism, and the
errors."""

import numpy as np
import pytest
import torch

import normkit
from normkit_testing import (FORMATS, assert_close, finite_difference_check, in_format,
                             is_channels_last, raises, t64, n64)


def evonorm64(x, v, weight, bias, groups, eps):
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    var = grouped.var(axis=-1, keepdims=True)  # biased
    std = np.broadcast_to(np.sqrt(var + eps), grouped.shape).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    v, w, b = (np.asarray(p, np.float64).reshape(shape) for p in (v, weight, bias))
    return x / (1 + np.exp(-v * x)) / std * w + b


def evonorm_torch(x, v, weight, bias, groups, eps):
    """timm's EvoNorm2dS0 formula in torch ops: x * sigmoid(v x) / group_std(x) * weight + bias."""
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    std = (grouped.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    std = std.expand(grouped.shape).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.sigmoid(v.view(shape) * x) / std * weight.view(shape) + bias.view(shape)


CASES = [((2, 6, 7, 5), 3), ((3, 5, 1, 1), 5), ((1, 8, 29), 2), ((2, 4, 3, 5, 2), 1),
         ((4, 6), 2), ((1, 261, 3, 3), 3), ((2, 6, 45, 47), 2)]


def inputs(rng, shape):
    x = 0.3 + 1.5 * rng.standard_normal(shape)
    c = shape[1]
    v = (1.0 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    weight = (0.8 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(c)).astype(np.float32)
    return x, v, weight, bias


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape,groups", CASES)
def test_forward_and_backward_match_float64_and_torch(rng, shape, groups, fmt):
    x, v, weight, bias = inputs(rng, shape)
    x = in_format(x, fmt)
    eps = 1e-5
    y, mean, rstd = normkit.evonorm_s0_forward(x, v, weight, bias, groups, eps=eps)
    assert mean.shape == (shape[0], groups) and rstd.shape == (shape[0], groups)
    assert_close(y, evonorm64(x, v, weight, bias, groups, eps), 2e-6, "y", magnitude=1.0)
    assert np.array_equal(normkit.evonorm_s0(x, v, weight, bias, groups, eps), y)
    # The statistics are group_norm's, bitwise.
    _, gn_mean, gn_rstd = normkit.group_norm_forward(x, groups, eps=eps)
    assert np.array_equal(mean, gn_mean) and np.array_equal(rstd, gn_rstd)
    if fmt == "channels_last" and len(shape) > 2:
        assert is_channels_last(y)

    dy = in_format(rng.standard_normal(shape), FORMATS[rng.integers(len(FORMATS))])
    dx, dv, dweight, dbias = normkit.evonorm_s0_backward(dy, x, mean, rstd, v, weight, groups)
    leaves = [t64(p).requires_grad_() for p in (x, v, weight, bias)]
    out = evonorm_torch(*leaves, groups, eps)
    assert_close(y, n64(out), 2e-6, "y against torch", magnitude=1.0)
    out.backward(t64(dy))
    gx, gv, gw, gb = (n64(p.grad) for p in leaves)
    terms = float(np.max(np.abs(dy)) * np.max(rstd) * np.max(np.abs(weight)))
    assert_close(dx, gx, 2e-5, "dx", magnitude=terms)
    assert_close(dv, gv, 2e-5, "dv", magnitude=1.0)
    assert_close(dweight, gw, 2e-5, "dweight", magnitude=1.0)
    assert_close(dbias, gb, 2e-5, "dbias", magnitude=1.0)
    finite_difference_check(lambda t: evonorm64(t, v, weight, bias, groups, eps), x, dy, dx,
                            1e-4, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_tensors_of_every_dtype(rng, dtype, channels_last):
    x, v, weight, bias = inputs(rng, (3, 12, 9, 11))
    x = torch.from_numpy(x).to(dtype)
    dy = torch.from_numpy(rng.standard_normal(x.shape)).to(dtype)
    if channels_last:  # torch tensors are not copied: dy comes in x's format
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = normkit.evonorm_s0_forward(x, v, weight, bias, 4)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    leaves = [x.double().requires_grad_()] + [torch.from_numpy(p).double().requires_grad_()
                                              for p in (v, weight, bias)]
    want = evonorm_torch(*leaves, 4, 1e-5)
    assert float((y.double() - want).abs().max()) <= 4 * ulp * float(want.abs().max()) + 1e-6
    dx, dv, dweight, dbias = normkit.evonorm_s0_backward(dy, x, mean, rstd, v, weight, 4)
    assert dx.dtype == dtype and dv.dtype == torch.float32
    want.backward(dy.double())
    for got, grad, name in ((dx, leaves[0].grad, "dx"), (dv, leaves[1].grad, "dv"),
                            (dweight, leaves[2].grad, "dweight"), (dbias, leaves[3].grad, "dbias")):
        error = float((got.double() - grad).abs().max())
        assert error <= 16 * ulp * float(grad.abs().max()) + 1e-6, name


def test_results_are_the_same_for_any_thread_count(rng):
    x, v, weight, bias = inputs(rng, (2, 6, 61, 67))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    keep = normkit.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            normkit.set_num_threads(threads)
            for fmt in ("channels_first", "channels_last"):
                xf = in_format(x, fmt)
                y, mean, rstd = normkit.evonorm_s0_forward(xf, v, weight, bias, 3)
                grads = normkit.evonorm_s0_backward(dy, xf, mean, rstd, v, weight, 3)
                results.setdefault(fmt, []).append([y, mean, rstd, *grads])
    finally:
        normkit.set_num_threads(keep)
    for fmt, runs in results.items():
        for outs in runs[1:]:
            for a, b in zip(outs, runs[0]):
                assert np.array_equal(a, b), fmt


def test_errors_name_the_argument():
    x = np.ones((2, 4, 3), np.float32)
    p = np.ones(4, np.float32)
    _, mean, rstd = normkit.evonorm_s0_forward(x, p, p, p, 2)
    with raises(ValueError, "evonorm_s0", "num_groups", "3"):
        normkit.evonorm_s0(x, p, p, p, 3)
    with raises(ValueError, "evonorm_s0", "v"):
        normkit.evonorm_s0(x, p[:3], p, p, 2)
    with raises(ValueError, "evonorm_s0", "bias"):
        normkit.evonorm_s0(x, p, p, p[:1], 2)
    with raises(ValueError, "evonorm_s0", "eps"):
        normkit.evonorm_s0(x, p, p, p, 2, eps=float("inf"))
    with raises(TypeError, "evonorm_s0", "weight"):
        normkit.evonorm_s0(x, p, p.astype(np.float64), p, 2)
    with raises(ValueError, "evonorm_s0_backward", "mean has shape (2, 1)", "(2, 2)"):
        normkit.evonorm_s0_backward(x, x, mean[:, :1], rstd, p, p, 2)
    with raises(ValueError, "evonorm_s0_backward", "dy"):
        normkit.evonorm_s0_backward(np.ones((2, 4, 5), np.float32), x, mean, rstd, p, p, 2)
