"""layer_norm against torch.nn.functional.layer_norm in float64."""

import numpy as np
import pytest
import torch.nn.functional as F

import normkit
from normkit_testing import (Config, assert_normalized_close, in_format, is_channels_first,
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
