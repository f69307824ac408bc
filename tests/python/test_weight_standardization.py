"""weight_standardization, its forward and backward against a float64 NumPy reference, timm's
StdConv2d formula in torch float64, and finite differences."""

import numpy as np
import pytest
import torch

import normkit
from normkit_testing import (assert_close, finite_difference_check, in_format, is_channels_last,
                             n64, raises, t64)


def ws64(w, eps=1e-5):
    w = np.asarray(w, np.float64)
    axes = tuple(range(1, w.ndim))
    mean = w.mean(axis=axes, keepdims=True)
    var = ((w - mean) ** 2).mean(axis=axes, keepdims=True)
    return (w - mean) / np.sqrt(var + eps)


def ws_timm(w64, eps):
    """timm's StdConv2d formula in torch ops: (w - mean) / sqrt(biased var + eps) per output
    channel (timm computes it with F.batch_norm over w viewed as (1, C_out, -1), which refuses
    one value per channel)."""
    dims = tuple(range(1, w64.dim()))
    var, mean = torch.var_mean(w64, dim=dims, unbiased=False, keepdim=True)
    return (w64 - mean) / torch.sqrt(var + eps)


SHAPES = [(64, 3, 7, 7), (23, 5, 3, 3), (17, 29, 1, 1), (8, 13), (5, 3, 3, 3, 3), (1, 1, 1, 1),
          (256, 64, 1, 1)]


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_and_timm(rng, shape, fmt):
    w = in_format(0.01 + 0.05 * rng.standard_normal(shape), fmt)
    w_hat, mean, rstd = normkit.weight_standardization_forward(w, eps=1e-5)
    assert mean.shape == (shape[0],) and rstd.shape == (shape[0],)
    assert_close(w_hat, ws64(w, 1e-5), 2e-6, "w_hat", magnitude=1.0)
    assert np.array_equal(normkit.weight_standardization(w, 1e-5), w_hat)
    if fmt == "channels_last" and len(shape) > 2:
        assert is_channels_last(w_hat)
    g = rng.standard_normal(shape).astype(np.float32)
    dw = normkit.weight_standardization_backward(g, w, mean, rstd)
    w64 = t64(w).requires_grad_()
    out = ws_timm(w64, 1e-5)
    assert_close(w_hat, n64(out), 2e-6, "w_hat against timm", magnitude=1.0)
    out.backward(t64(g))
    # The size of the terms that cancel in dw (all of them with one value per channel).
    terms = float(np.max(np.abs(g)) * np.max(rstd))
    assert_close(dw, n64(w64.grad), 1e-5, "dw", magnitude=terms)
    if w[0].size > 1:  # one value per channel: w_hat is 0 whatever w, nothing to differentiate
        finite_difference_check(lambda v: ws64(v, 1e-5), w, g, dw, 1e-4, "dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_tensors_of_every_dtype(rng, dtype):
    w = torch.from_numpy(0.02 * rng.standard_normal((128, 64, 3, 3))).to(dtype)
    w_hat, mean, rstd = normkit.weight_standardization_forward(w)
    assert isinstance(w_hat, torch.Tensor) and w_hat.dtype == dtype
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    w64 = w.double().requires_grad_()
    want = ws_timm(w64, 1e-5)
    assert float((w_hat.double() - want).abs().max()) <= 2 * ulp * float(want.abs().max()) + 1e-5
    g = torch.from_numpy(rng.standard_normal(w.shape)).to(dtype)
    dw = normkit.weight_standardization_backward(g, w, mean, rstd)
    assert dw.dtype == dtype
    want.backward(g.double())
    assert float((dw.double() - w64.grad).abs().max()) <= 16 * ulp * float(w64.grad.abs().max())


def test_errors_name_the_argument():
    w = np.ones((4, 2, 3), np.float32)
    _, mean, rstd = normkit.weight_standardization_forward(w)
    with raises(ValueError, "weight_standardization", "w"):
        normkit.weight_standardization(np.ones(5, np.float32))
    with raises(ValueError, "weight_standardization", "eps"):
        normkit.weight_standardization(w, eps=float("nan"))
    with raises(TypeError, "weight_standardization", "w"):
        normkit.weight_standardization(w.astype(np.float64))
    with raises(ValueError, "weight_standardization_backward", "mean has shape (3,)", "(4,)"):
        normkit.weight_standardization_backward(w, w, mean[:3], rstd)
    with raises(ValueError, "weight_standardization_backward", "dw_hat"):
        normkit.weight_standardization_backward(np.ones((4, 6), np.float32), w, mean, rstd)
