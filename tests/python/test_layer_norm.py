"""layer_norm, layer_norm_forward and layer_norm_backward against torch in float64 and finite
differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit_testing import (Config, assert_close, assert_normalized_close,
                             check_epilogue_errors, check_fused_epilogue,
                             finite_difference_check, in_format, is_channels_first,
                             is_channels_last, moments, n64, raises, t64)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5, 6])
def test_matches_torch(rng, rank, fmt, affine, seed):
    if fmt == "channels_last" and rank < 3:
        pytest.skip("no channels-last below rank 3")
    normalized_ndim = int(rng.integers(1, rank + 1))
    if fmt == "channels_last" and rng.random() < 0.5:
        normalized_ndim = rank - 1  # the case computed channels-last (up to rank 5)
    while True:  # a single normalized value gives y = bias: no statistics to test
        shape = tuple(int(rng.choice([1, 2, 3, 5, 7])) for _ in range(rank))
        normalized = shape[rank - normalized_ndim:]
        if np.prod(normalized) > 1:
            break
    cfg = Config(rng, 1, 0, fmt)  # only its value distribution is used
    x = in_format(cfg.offset + cfg.scale * rng.standard_normal(shape), fmt)
    weight = cfg.vector(normalized, 1.0, 0.5) if affine else None
    bias = cfg.vector(normalized, 0.0, 2.0) if affine else None
    # An int, a tuple or a list, as torch accepts.
    arg = normalized[0] if normalized_ndim == 1 and seed == 0 else (
        list(normalized) if seed == 1 else normalized)

    y = normkit.layer_norm(x, arg, weight, bias, cfg.eps)
    y_ref = F.layer_norm(t64(x), normalized, t64(weight) if affine else None,
                         t64(bias) if affine else None, cfg.eps)
    mean, rstd = moments(x, tuple(range(rank - normalized_ndim, rank)), cfg.eps)
    assert_normalized_close(y, n64(y_ref), x, mean, rstd, weight,
                            f"y shape={shape} normalized={normalized} {cfg}")
    if fmt == "channels_last" and normalized_ndim == rank - 1 and rank <= 5:
        assert y.strides == x.strides and is_channels_last(y)
    else:
        assert is_channels_first(y), (y.shape, y.strides)


def test_empty_rows():
    x = np.zeros((0, 3, 5), np.float32)
    assert normkit.layer_norm(x, (3, 5)).shape == x.shape
    assert normkit.layer_norm(x, 5, np.ones(5, np.float32)).shape == x.shape


def test_bad_arguments(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    with raises(ValueError, "normalized_shape", "(3,)", "(2, 3, 4)"):
        normkit.layer_norm(x, 3)
    with raises(ValueError, "normalized_shape", "(5, 2, 3, 4)"):
        normkit.layer_norm(x, (5, 2, 3, 4))
    with raises(ValueError, "normalized_shape"):
        normkit.layer_norm(x, ())
    with raises(TypeError, "normalized_shape", "'4'"):
        normkit.layer_norm(x, "4")
    with raises(TypeError, "normalized_shape", "4.0"):
        normkit.layer_norm(x, [4.0])
    with raises(ValueError, "weight", "(12,)", "(3, 4)"):
        normkit.layer_norm(x, (3, 4), np.ones(12, np.float32))
    with raises(ValueError, "bias", "(4,)", "(3, 4)"):
        normkit.layer_norm(x, (3, 4), None, np.ones(4, np.float32))
    with raises(ValueError, "eps", "-0.5"):
        normkit.layer_norm(x, 4, eps=-0.5)
    with raises(TypeError, "x", "float64"):
        normkit.layer_norm(x.astype(np.float64), 4)
    with raises(TypeError, "weight", "float64"):
        normkit.layer_norm(x, 4, np.ones(4))


@pytest.mark.parametrize("case", [
    ((4, 37), 1, "channels_first"),
    ((3, 5, 7, 9), 3, "channels_first"),
    ((2, 6, 4, 5), 2, "channels_first"),
    ((2, 6, 4, 5), 3, "channels_last"),
    ((2, 3, 2, 3, 4), 4, "channels_last"),
    ((3, 2100), 1, "channels_first"),
])
@pytest.mark.parametrize("affine", [True, False])
def test_float16_matches_torch(rng, case, affine):
    """float16 x: the result is torch's float64 layer_norm of the same (float16) values, rounded
    once to float16, so it is within float16's rounding of it plus a float32-sized term."""
    shape, normalized_ndim, fmt = case
    rank = len(shape)
    normalized = shape[rank - normalized_ndim:]
    x16 = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float16)
    x = in_format(x16, fmt).astype(np.float16)  # float16 values, laid out as fmt
    if fmt == "channels_last":
        assert is_channels_last(x)
    weight = (1.0 + 0.5 * rng.standard_normal(normalized)).astype(np.float32) if affine else None
    bias = rng.standard_normal(normalized).astype(np.float32) if affine else None
    y = normkit.layer_norm(x, normalized, weight, bias, 1e-5)
    assert y.dtype == np.float16 and y.shape == x.shape
    if fmt == "channels_last":
        assert is_channels_last(y)
    y_ref = n64(F.layer_norm(t64(x16), normalized, t64(weight) if affine else None,
                             t64(bias) if affine else None, 1e-5))
    err = np.abs(y.astype(np.float64) - y_ref)
    bound = 2.0 ** -11 * np.abs(y_ref) + 1e-5 * (1 + np.abs(y_ref).max())
    assert np.all(np.isfinite(y))
    worst = float((err - bound).max())
    assert worst <= 0, f"float16 y off by more than its rounding ({worst}), shape {shape}"


def random_problem(rng, rank, fmt):
    """(x, normalized_shape, cfg) with odd sizes and more than one normalized value."""
    normalized_ndim = int(rng.integers(1, rank + 1))
    if fmt == "channels_last" and rng.random() < 0.5:
        normalized_ndim = rank - 1  # the case computed channels-last (up to rank 5)
    while True:
        shape = tuple(int(rng.choice([1, 2, 3, 5, 7])) for _ in range(rank))
        normalized = shape[rank - normalized_ndim:]
        if np.prod(normalized) > 1:
            break
    cfg = Config(rng, 1, 0, fmt)  # only its value distribution is used
    x = in_format(cfg.offset + cfg.scale * rng.standard_normal(shape), fmt)
    return x, normalized, cfg


def expected_layout(x, fmt, normalized):
    if fmt == "channels_last" and len(normalized) == x.ndim - 1 and x.ndim <= 5:
        return "channels_last"
    return "channels_first"


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5, 6])
def test_forward_statistics_and_backward_match_torch(rng, rank, fmt, affine, seed):
    if fmt == "channels_last" and rank < 3:
        pytest.skip("no channels-last below rank 3")
    x, normalized, cfg = random_problem(rng, rank, fmt)
    weight = cfg.vector(normalized, 1.0, 0.5) if affine else None
    bias = cfg.vector(normalized, 0.0, 2.0) if affine else None
    dy = in_format(rng.standard_normal(x.shape), ["channels_first", "strided"][seed])

    y, mean, rstd = normkit.layer_norm_forward(x, normalized, weight, bias, cfg.eps)
    assert np.array_equal(y, normkit.layer_norm(x, normalized, weight, bias, cfg.eps))
    x64 = t64(x).requires_grad_()
    w64 = t64(weight).requires_grad_() if affine else None
    b64 = t64(bias).requires_grad_() if affine else None
    y_ref, mean_ref, rstd_ref = torch.native_layer_norm(x64, normalized, w64, b64, cfg.eps)
    what = f"shape={x.shape} normalized={normalized} {cfg}"
    assert mean.shape == tuple(mean_ref.shape) and rstd.shape == tuple(rstd_ref.shape), what
    tol = cfg.tol()
    assert_normalized_close(y, n64(y_ref), x, n64(mean_ref), n64(rstd_ref), weight, "y " + what)
    assert_close(mean, n64(mean_ref), tol, "mean " + what, cfg.value_size)
    assert_close(rstd, n64(rstd_ref), tol, "rstd " + what)

    dx, dweight, dbias = normkit.layer_norm_backward(dy, x, normalized, mean, rstd, weight)
    y_ref.backward(t64(dy))
    w = 1.0 if weight is None else np.abs(weight)
    terms = float(np.max(np.abs(dy) * w * n64(rstd_ref)))
    assert_close(dx, n64(x64.grad), 20 * tol, "dx " + what, terms)
    layout = expected_layout(x, fmt, normalized)
    assert (is_channels_last(dx) if layout == "channels_last" else is_channels_first(dx)), \
        (dx.shape, dx.strides)
    if affine:
        assert dweight.shape == normalized and dbias.shape == normalized
        assert_close(dweight, n64(w64.grad), 20 * tol, "dweight " + what)
        assert_close(dbias, n64(b64.grad), 20 * tol, "dbias " + what)
    else:
        assert dweight is None and dbias is None


@pytest.mark.parametrize("case", [((3, 7), 1), ((2, 5, 3), 2), ((2, 3, 5, 3), 3),
                                  ((1, 2, 3, 2, 3, 2), 4)])
def test_backward_matches_finite_differences(rng, case):
    shape, normalized_ndim = case
    normalized = shape[len(shape) - normalized_ndim:]
    axes = tuple(range(len(shape) - normalized_ndim, len(shape)))
    x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = (1.0 + 0.5 * rng.standard_normal(normalized)).astype(np.float32)
    _, mean, rstd = normkit.layer_norm_forward(x, normalized, weight, None, 1e-5)
    dx, _, _ = normkit.layer_norm_backward(dy, x, normalized, mean, rstd, weight)

    def forward64(x):
        m, r = moments(x, axes, 1e-5)
        return (x - m) * r * weight

    finite_difference_check(forward64, x, dy, dx, 1e-4, f"shape={shape}", rng=rng)


def test_backward_takes_torch_statistics(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, rstd = torch.native_layer_norm(torch.from_numpy(x), (4, 5), None, None, 1e-5)
    dx, _, _ = normkit.layer_norm_backward(dy, x, (4, 5), mean.numpy(), rstd.numpy())
    x64 = t64(x).requires_grad_()
    F.layer_norm(x64, (4, 5)).backward(t64(dy))
    assert_close(dx, n64(x64.grad), 1e-4, "dx")


def test_forward_backward_empty_rows():
    x = np.zeros((0, 3, 5), np.float32)
    y, mean, rstd = normkit.layer_norm_forward(x, (3, 5))
    assert y.shape == x.shape and mean.shape == (0, 1, 1) and rstd.shape == (0, 1, 1)
    dx, dweight, dbias = normkit.layer_norm_backward(x, x, (3, 5), mean, rstd,
                                                     np.ones((3, 5), np.float32))
    assert dx.shape == x.shape
    assert np.array_equal(dweight, np.zeros((3, 5))) and np.array_equal(dbias, np.zeros((3, 5)))


def test_backward_bad_arguments(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    _, mean, rstd = normkit.layer_norm_forward(x, (3, 4))
    dy = np.ones_like(x)
    w = np.ones((3, 4), np.float32)
    cases = [
        (ValueError, ("dy", "(2, 3, 5)", "(2, 3, 4)"),
         lambda: normkit.layer_norm_backward(np.ones((2, 3, 5), np.float32), x, (3, 4), mean,
                                             rstd)),
        (TypeError, ("dy", "float16", "float32"),
         lambda: normkit.layer_norm_backward(dy.astype(np.float16), x, (3, 4), mean, rstd)),
        (TypeError, ("dy", "float64"),
         lambda: normkit.layer_norm_backward(dy.astype(np.float64), x, (3, 4), mean, rstd)),
        (ValueError, ("mean", "(2,)", "(2, 1, 1)"),
         lambda: normkit.layer_norm_backward(dy, x, (3, 4), mean.reshape(-1), rstd)),
        (ValueError, ("rstd", "(2, 1)", "(2, 1, 1)"),
         lambda: normkit.layer_norm_backward(dy, x, (3, 4), mean, rstd.reshape(2, 1))),
        (ValueError, ("mean", "(2, 3, 1)"),
         lambda: normkit.layer_norm_backward(dy, x, 4, mean, rstd)),
        (TypeError, ("rstd", "float64"),
         lambda: normkit.layer_norm_backward(dy, x, (3, 4), mean, rstd.astype(np.float64))),
        (ValueError, ("normalized_shape", "(5,)"),
         lambda: normkit.layer_norm_backward(dy, x, 5, mean, rstd)),
        (ValueError, ("weight", "(4,)", "(3, 4)"),
         lambda: normkit.layer_norm_backward(dy, x, (3, 4), mean, rstd, np.ones(4, np.float32))),
        (TypeError, ("weight", "float64"),
         lambda: normkit.layer_norm_backward(dy, x, (3, 4), mean, rstd, w.astype(np.float64))),
    ]
    for exception, fragments, call in cases:
        with raises(exception, "layer_norm_backward", *fragments):
            call()
    with raises(ValueError, "layer_norm_forward", "eps"):
        normkit.layer_norm_forward(x, 4, eps=-1.0)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last", "strided"])
@pytest.mark.parametrize("rank", [2, 3, 4, 6])
def test_fused_epilogues_match_torch(rng, rank, fmt, affine):
    if fmt == "channels_last" and rank < 3:
        pytest.skip("no channels-last below rank 3")
    x, normalized, cfg = random_problem(rng, rank, fmt)
    x = in_format(1.0 + rng.standard_normal(x.shape), fmt)
    weight = cfg.vector(normalized, 1.0, 0.5) if affine else None
    bias = cfg.vector(normalized, 0.0, 2.0) if affine else None
    check_fused_epilogue(
        rng, x, weight, bias,
        lambda x, w, b, **kw: normkit.layer_norm_forward(x, normalized, w, b, 1e-5, **kw),
        lambda dy, x, saved, w, **kw: normkit.layer_norm_backward(dy, x, normalized, *saved, w,
                                                                  **kw),
        lambda x64, w64, b64: F.layer_norm(x64, normalized, w64, b64, 1e-5),
        1e-5, f"shape={x.shape} normalized={normalized}")


@pytest.mark.parametrize("case", [((2, 3, 4, 5), 3, "channels_last"),
                                  ((2, 3, 4, 5), 2, "channels_first"),
                                  ((2, 1, 3, 1, 2, 4), 2, "channels_first")])
def test_epilogue_errors(rng, case):
    shape, normalized_ndim, fmt = case
    normalized = shape[len(shape) - normalized_ndim:]
    x = in_format(rng.standard_normal(shape), fmt)
    check_epilogue_errors(
        x, lambda x, **kw: normkit.layer_norm_forward(x, normalized, **kw),
        lambda dy, x, saved, **kw: normkit.layer_norm_backward(dy, x, normalized, *saved, **kw))
