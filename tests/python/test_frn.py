"""frn (Filter Response Normalization + TLU), its forward and backward against a float64 NumPy
reference, the formula composed of torch ops in float64 (autograd for the gradients), and finite
differences; every layout and dtype, thread-count determinism, and the errors."""

import numpy as np
import pytest
import torch

import normkit
from normkit_testing import (FORMATS, assert_close, finite_difference_check, in_format,
                             is_channels_last, raises, t64, n64)


def frn64(x, weight, bias, tau, eps):
    x = np.asarray(x, np.float64)
    axes = tuple(range(2, x.ndim))
    nu2 = (x * x).mean(axis=axes, keepdims=True) if axes else x * x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    w, b, t = (np.asarray(v, np.float64).reshape(shape) for v in (weight, bias, tau))
    return np.maximum(x / np.sqrt(nu2 + eps) * w + b, t)


def frn_torch(x, weight, bias, tau, eps):
    """The paper's formula in torch ops (float64 tensors; autograd gives the oracle's gradients).
    torch.maximum splits a tie's gradient in halves; ties do not occur with random inputs."""
    dims = tuple(range(2, x.dim()))
    nu2 = x.pow(2).mean(dim=dims, keepdim=True) if dims else x.pow(2)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    z = x * torch.rsqrt(nu2 + eps) * weight.view(shape) + bias.view(shape)
    return torch.maximum(z, tau.view(shape))


SHAPES = [(2, 3, 7, 5), (3, 5, 1, 1), (1, 7, 29), (2, 1, 3, 5, 2), (4, 3), (1, 261, 3, 3),
          (2, 6, 45, 47)]


def inputs(rng, shape):
    x = 0.3 + 1.5 * rng.standard_normal(shape)
    c = shape[1]
    weight = (0.8 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(c)).astype(np.float32)
    tau = (-0.2 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    return x, weight, bias, tau


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_and_torch(rng, shape, fmt):
    x, weight, bias, tau = inputs(rng, shape)
    x = in_format(x, fmt)
    eps = 1e-6
    y, rstd = normkit.frn_forward(x, weight, bias, tau, eps=eps)
    assert rstd.shape == shape[:2] and rstd.dtype == np.float32
    want = frn64(x, weight, bias, tau, eps)
    assert_close(y, want, 2e-6, "y", magnitude=1.0)
    assert np.array_equal(normkit.frn(x, weight, bias, tau, eps), y)
    if fmt == "channels_last" and len(shape) > 2:
        assert is_channels_last(y)
    axes = tuple(range(2, len(shape)))
    squares = np.asarray(x, np.float64) ** 2
    nu2 = squares.mean(axis=axes) if axes else squares
    assert_close(rstd, 1 / np.sqrt(nu2 + eps), 1e-6, "rstd")

    dy = in_format(rng.standard_normal(shape), FORMATS[rng.integers(len(FORMATS))])
    dx, dweight, dbias, dtau = normkit.frn_backward(dy, x, rstd, weight, bias, tau)
    leaves = [t64(v).requires_grad_() for v in (x, weight, bias, tau)]
    out = frn_torch(*leaves, eps)
    assert_close(y, n64(out), 2e-6, "y against torch", magnitude=1.0)
    out.backward(t64(dy))
    gx, gw, gb, gt = (n64(v.grad) for v in leaves)
    terms = float(np.max(np.abs(dy)) * np.max(rstd) * np.max(np.abs(weight)))
    assert_close(dx, gx, 2e-5, "dx", magnitude=terms)
    assert_close(dweight, gw, 2e-5, "dweight", magnitude=1.0)
    assert_close(dbias, gb, 2e-5, "dbias", magnitude=1.0)
    assert_close(dtau, gt, 2e-5, "dtau", magnitude=1.0)
    # One position per channel: dx = w r g (1 - xhat^2) is float32 rounding of cancelling terms
    # (checked against torch above, relative to the terms).
    if np.prod(shape[2:], dtype=np.int64) > 1:
        finite_difference_check(lambda v: frn64(v, weight, bias, tau, eps), x, dy, dx, 1e-4,
                                "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_tensors_of_every_dtype(rng, dtype, channels_last):
    x, weight, bias, tau = inputs(rng, (3, 19, 9, 11))
    x = torch.from_numpy(x).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, rstd = normkit.frn_forward(x, weight, bias, tau)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    leaves = [x.double().requires_grad_()] + [torch.from_numpy(v).double().requires_grad_()
                                              for v in (weight, bias, tau)]
    want = frn_torch(*leaves, 1e-6)
    assert float((y.double() - want).abs().max()) <= 2 * ulp * float(want.abs().max()) + 1e-6
    dy = torch.from_numpy(rng.standard_normal(x.shape)).to(dtype)
    if channels_last:  # torch tensors are not copied: dy comes in x's format
        dy = dy.contiguous(memory_format=torch.channels_last)
    dx, dweight, dbias, dtau = normkit.frn_backward(dy, x, rstd, weight, bias, tau)
    assert dx.dtype == dtype and dweight.dtype == torch.float32
    want.backward(dy.double())
    for got, grad, name in ((dx, leaves[0].grad, "dx"), (dweight, leaves[1].grad, "dweight"),
                            (dbias, leaves[2].grad, "dbias"), (dtau, leaves[3].grad, "dtau")):
        error = float((got.double() - grad).abs().max())
        assert error <= 16 * ulp * float(grad.abs().max()) + 1e-6, name


def test_results_are_the_same_for_any_thread_count(rng):
    x, weight, bias, tau = inputs(rng, (2, 6, 61, 67))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    keep = normkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            normkit.set_num_threads(threads)
            for fmt in ("channels_first", "channels_last"):
                xf = in_format(x, fmt)
                y, rstd = normkit.frn_forward(xf, weight, bias, tau)
                results.append((fmt, [y, rstd, *normkit.frn_backward(dy, xf, rstd, weight, bias,
                                                                      tau)]))
    finally:
        normkit.set_num_threads(keep)
    for fmt, outs in results:
        first = next(o for f, o in results if f == fmt)
        for a, b in zip(outs, first):
            assert np.array_equal(a, b), fmt


def test_errors_name_the_argument():
    x = np.ones((2, 3, 4), np.float32)
    v = np.ones(3, np.float32)
    _, rstd = normkit.frn_forward(x, v, v, v)
    with raises(ValueError, "frn", "tau", "length 2"):
        normkit.frn(x, v, v, v[:2])
    with raises(ValueError, "frn", "weight"):
        normkit.frn(x, v[:1], v, v)
    with raises(ValueError, "frn", "eps"):
        normkit.frn(x, v, v, v, eps=-1.0)
    with raises(ValueError, "frn", "x"):
        normkit.frn(np.ones(5, np.float32), v, v, v)
    with raises(TypeError, "frn", "x"):
        normkit.frn(x.astype(np.float64), v, v, v)
    with raises(TypeError, "frn", "tau"):
        normkit.frn(x, v, v, v.astype(np.float64))
    with raises(ValueError, "frn_backward", "rstd has shape (2, 2)", "(2, 3)"):
        normkit.frn_backward(x, x, rstd[:, :2], v, v, v)
    with raises(ValueError, "frn_backward", "dy"):
        normkit.frn_backward(np.ones((2, 3, 5), np.float32), x, rstd, v, v, v)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (3, 5, 1, 1), (1, 7, 29), (4, 3),
                                   (2, 1, 3, 5, 2)])
@pytest.mark.parametrize("learned", [0.03, -0.2])
def test_learned_eps_matches_torch_autograd(rng, shape, fmt, learned):
    """eps = eps_min + |learned_eps|, composed in torch float64: autograd gives d learned_eps."""
    x, weight, bias, tau = inputs(rng, shape)
    x = in_format(x, fmt)
    eps_min = 1e-3
    y, rstd = normkit.frn_forward(x, weight, bias, tau, eps=eps_min, learned_eps=learned)
    # The same as passing the sum as eps, bit for bit.
    y_sum, rstd_sum = normkit.frn_forward(x, weight, bias, tau, eps=eps_min + abs(learned))
    assert np.array_equal(y, y_sum) and np.array_equal(rstd, rstd_sum)
    assert np.array_equal(normkit.frn(x, weight, bias, tau, eps_min, learned_eps=learned), y)

    dy = in_format(rng.standard_normal(shape), fmt)
    grads = normkit.frn_backward(dy, x, rstd, weight, bias, tau, learned_eps=learned)
    assert len(grads) == 5 and isinstance(grads[4], float)
    # The other gradients are the bits of the call without learned_eps.
    for got, want in zip(grads[:4], normkit.frn_backward(dy, x, rstd, weight, bias, tau)):
        assert np.array_equal(got, want)

    leaves = [t64(v) for v in (x, weight, bias, tau)]
    learned_t = torch.tensor(learned, dtype=torch.float64, requires_grad=True)
    out = frn_torch(*leaves, eps_min + learned_t.abs())
    out.backward(t64(dy))
    want = float(learned_t.grad)
    # The size of the summed terms: w / 2 * rstd^3 * |dy x| over every element.
    axes = tuple(range(2, len(shape)))
    r = 1 / np.sqrt((np.asarray(x, np.float64) ** 2).mean(axis=axes) + eps_min + abs(learned)) \
        if axes else 1 / np.sqrt(np.asarray(x, np.float64) ** 2 + eps_min + abs(learned))
    dyx = np.abs(np.asarray(dy, np.float64) * np.asarray(x, np.float64))
    dyx = dyx.sum(axis=axes) if axes else dyx
    terms = float((0.5 * np.abs(weight) * r ** 3 * dyx).sum())
    assert abs(grads[4] - want) <= 1e-5 * max(abs(want), terms), (grads[4], want)
    assert np.sign(grads[4]) == np.sign(want) or abs(want) < 1e-5 * terms


def test_learned_eps_tlu_inactive_and_zero(rng):
    """No element below tau: d learned_eps is all of the normalization's; learned_eps = 0: the
    gradient of |.| at 0 is 0, as torch's."""
    x, weight, bias, _ = inputs(rng, (2, 4, 5, 3))
    tau = np.full(4, -1e30, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for fmt in FORMATS:
        xf = in_format(x, fmt)
        for learned in (0.05, 0.0):
            _, rstd = normkit.frn_forward(xf, weight, bias, tau, eps=1e-4, learned_eps=learned)
            *grads, d_learned = normkit.frn_backward(dy, xf, rstd, weight, bias, tau,
                                                    learned_eps=learned)
            assert np.array_equal(grads[3], np.zeros(4, np.float32))
            learned_t = torch.tensor(learned, dtype=torch.float64, requires_grad=True)
            out = frn_torch(*(t64(v) for v in (xf, weight, bias, tau)), 1e-4 + learned_t.abs())
            out.backward(t64(dy))
            want = float(learned_t.grad)
            if learned == 0.0:
                assert d_learned == 0.0 and want == 0.0
            else:
                assert abs(d_learned - want) <= 1e-5 * abs(want) + 1e-6, (d_learned, want)


def test_learned_eps_errors_name_it():
    x = np.ones((2, 3, 4), np.float32)
    v = np.ones(3, np.float32)
    _, rstd = normkit.frn_forward(x, v, v, v)
    for f, call in (("frn", lambda le: normkit.frn(x, v, v, v, learned_eps=le)),
                    ("frn_forward", lambda le: normkit.frn_forward(x, v, v, v, learned_eps=le)),
                    ("frn_backward",
                     lambda le: normkit.frn_backward(x, x, rstd, v, v, v, learned_eps=le))):
        with raises(TypeError, f, "learned_eps", "one eps per layer"):
            call(np.full(3, 0.1, np.float32))
        with raises(TypeError, f, "learned_eps"):
            call("0.1")
        with raises(ValueError, f, "learned_eps", "nan"):
            call(float("nan"))
