"""layer_norm2d, layer_norm2d_forward and layer_norm2d_backward against a float64 NumPy
reference, torch's composition (permute -> layer_norm -> permute) in float64, and finite
differences, in both memory formats and every activation dtype."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit_testing import (assert_close, finite_difference_check, in_format,
                             is_channels_first, is_channels_last, n64, raises, t64)


def ln2d64(x, weight=None, bias=None, eps=1e-6):
    """float64 NumPy reference over axis 1: (y, mean, rstd) with the statistics of shape
    (N, *spatial)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    y = (x - mean) * rstd
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y, mean[:, 0], rstd[:, 0]


def ln2d_torch(x64, w64, b64, eps):
    """What ConvNeXt's LayerNorm2d does with torch: channels to the end and back."""
    order = (0,) + tuple(range(2, x64.dim())) + (1,)
    back = (0, x64.dim() - 1) + tuple(range(1, x64.dim() - 1))
    y = F.layer_norm(x64.permute(*order), (x64.shape[1],), w64, b64, eps)
    return y.permute(*back)


SHAPES = [(2, 5, 7, 3), (3, 23, 11, 13), (1, 96, 9, 9), (4, 7), (2, 3, 5, 4, 3), (5, 1, 67),
          (2, 29, 131)]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_and_torch(rng, shape, fmt, affine):
    x = in_format(2.0 + 3.0 * rng.standard_normal(shape), fmt)
    C = shape[1]
    w = (1.0 + 0.5 * rng.standard_normal(C)).astype(np.float32) if affine else None
    b = rng.standard_normal(C).astype(np.float32) if affine else None
    y, mean, rstd = normkit.layer_norm2d_forward(x, w, b, eps=1e-5)
    want, want_mean, want_rstd = ln2d64(x, w, b, 1e-5)
    assert_close(y, want, 2e-6, "y", magnitude=1.0)
    assert_close(mean, want_mean, 2e-6, "mean", magnitude=5.0)
    assert_close(rstd, want_rstd, 2e-6, "rstd")
    assert np.array_equal(normkit.layer_norm2d(x, w, b, eps=1e-5), y)
    if fmt == "channels_last" and len(shape) > 2:
        assert is_channels_last(y)
    elif fmt != "channels_last":
        assert is_channels_first(y)

    dy = in_format(rng.standard_normal(shape), "strided")
    dx, dw, db = normkit.layer_norm2d_backward(dy, x, mean, rstd, w)
    x64 = t64(x).requires_grad_()
    w64 = t64(w).requires_grad_() if affine else None
    b64 = t64(b).requires_grad_() if affine else None
    out = ln2d_torch(x64, w64, b64, 1e-5)
    # y is O(1) whatever the affine: its yardstick where all of it cancels (one channel).
    assert_close(y, n64(out), 2e-6, "y against torch", magnitude=1.0)
    out.backward(t64(dy))
    # The size of the terms that cancel in dx (all of them with one channel).
    terms = float(np.max(np.abs(dy)) * (np.max(np.abs(w)) if affine else 1.0) * np.max(rstd))
    assert_close(dx, n64(x64.grad), 1e-5, "dx", magnitude=terms)
    if affine:
        assert_close(dw, n64(w64.grad), 1e-5, "dweight", magnitude=float(np.sum(np.abs(dy))))
        assert_close(db, n64(b64.grad), 1e-5, "dbias")
    else:
        assert dw is None and db is None
    if C > 1:  # with one channel y is b whatever x: dx is 0, nothing to differentiate
        finite_difference_check(lambda v: ln2d64(v, w, b, 1e-5)[0], x, dy, dx, 1e-4, "dx")


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_tensors_of_every_dtype(rng, dtype, fmt):
    """torch in, torch out, x's dtype and format kept; the float64 value of the rounded inputs,
    rounded once."""
    x = torch.from_numpy(rng.standard_normal((3, 40, 9, 11)) * 2 + 1).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.from_numpy((1 + 0.3 * rng.standard_normal(40)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    y, mean, rstd = normkit.layer_norm2d_forward(x, w, b)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
    assert mean.shape == (3, 9, 11) and mean.dtype == torch.float32
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_()
    want = ln2d_torch(x64, w64, b64, 1e-6)
    err = (y.double() - want).abs()
    assert bool((err <= 2 * ulp * want.abs() + 1e-5 * float(want.abs().max())).all())
    dy = torch.from_numpy(rng.standard_normal(x.shape)).to(dtype)
    if fmt == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    dx, dw, db = normkit.layer_norm2d_backward(dy, x, mean, rstd, w)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    want.backward(dy.double())
    terms = float((dy.double().abs() * w.double().abs().view(1, -1, 1, 1)).max() * rstd.max())
    assert float((dx.double() - x64.grad).abs().max()) <= 8 * ulp * terms + 1e-5 * terms
    assert float((dw.double() - w64.grad).abs().max()) <= 1e-3 * float(w64.grad.abs().max())
    assert float((db.double() - b64.grad).abs().max()) <= 1e-3 * float(b64.grad.abs().max())


def test_bitwise_for_any_thread_count(rng):
    x = in_format(rng.standard_normal((2, 64, 19, 23)) + 1, "channels_first")
    w = rng.standard_normal(64).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    keep = normkit.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            normkit.set_num_threads(threads)
            for fmt in ("channels_first", "channels_last"):
                xf = in_format(x, fmt)
                y, mean, rstd = normkit.layer_norm2d_forward(xf, w, w)
                results.append((threads, fmt, y, mean, rstd,
                                *normkit.layer_norm2d_backward(dy, xf, mean, rstd, w)))
    finally:
        normkit.set_num_threads(keep)
    for r in results[2:]:
        first = results[0] if r[1] == "channels_first" else results[1]
        for a, b in zip(first[2:], r[2:]):
            assert np.array_equal(a, b), (r[0], r[1])


def test_errors_name_the_argument():
    x = np.zeros((2, 3, 4), np.float32)
    y, mean, rstd = normkit.layer_norm2d_forward(x)
    with raises(ValueError, "layer_norm2d", "weight has length 4", "C = 3"):
        normkit.layer_norm2d(x, np.ones(4, np.float32))
    with raises(ValueError, "layer_norm2d", "eps"):
        normkit.layer_norm2d(x, eps=-1.0)
    with raises(ValueError, "layer_norm2d"):
        normkit.layer_norm2d(np.zeros(5, np.float32))
    with raises(TypeError, "layer_norm2d", "weight"):
        normkit.layer_norm2d(x, np.ones(3, np.float64))
    with raises(ValueError, "layer_norm2d_backward", "rstd has shape (2, 3)", "(2, 4)"):
        normkit.layer_norm2d_backward(x, x, mean, np.ones((2, 3), np.float32))
    with raises(ValueError, "layer_norm2d_backward", "dy"):
        normkit.layer_norm2d_backward(np.zeros((2, 3, 5), np.float32), x, mean, rstd)
    with raises(TypeError, "layer_norm2d_backward", "dy", "float16"):
        normkit.layer_norm2d_backward(x.astype(np.float16), x, mean, rstd)
