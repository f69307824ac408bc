"""float16 activations from NumPy: computed in float32 inside (weights, statistics and sums are
float32), so a float16 result must equal the float32 path on the same rounded inputs to within
the rounding of the float16 output."""

import numpy as np
import pytest

import normkit
from normkit_testing import is_channels_last

# float16 has 11 significant bits: rounding the float32 result once costs at most 2^-11
# relative; allow twice that plus a float32-sized absolute term.
HALF_REL = 2.0 ** -10


def half_input(shape, rng, fmt, offset=0.0):
    a = (offset + rng.standard_normal(shape)).astype(np.float16)
    if fmt == "channels_last":
        a = np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
    return a


def assert_half_matches(out16, out32, what):
    assert out16.dtype == np.float16, what
    assert np.all(np.isfinite(out16)), what
    exact = out32.astype(np.float32)
    err = np.abs(out16.astype(np.float32) - exact)
    bound = HALF_REL * np.abs(exact) + 1e-5 * (1 + np.abs(exact).max())
    worst = float((err - bound).max())
    assert worst <= 0, f"{what}: float16 result off by more than its rounding ({worst})"


SHAPES = [(2, 6, 5, 7), (1, 8, 33), (3, 4), (2, 4, 3, 5, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_group_norm_float16_matches_float32_path(shape, fmt):
    if fmt == "channels_last" and len(shape) < 3:
        pytest.skip("rank 2 has one format")
    rng = np.random.default_rng(16)
    c = shape[1]
    x = half_input(shape, rng, fmt, offset=3.0)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    g = 2
    y16, mean16, rstd16 = normkit.group_norm_forward(x, g, w, b)
    y32, mean32, rstd32 = normkit.group_norm_forward(x.astype(np.float32), g, w, b)
    assert_half_matches(y16, y32, "y")
    np.testing.assert_allclose(mean16, mean32, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rstd16, rstd32, rtol=1e-5)
    if fmt == "channels_last":
        assert is_channels_last(y16)

    dy = half_input(shape, rng, fmt)
    dx16, dw16, db16 = normkit.group_norm_backward(dy, x, mean16, rstd16, g, w)
    dx32, dw32, db32 = normkit.group_norm_backward(dy.astype(np.float32), x.astype(np.float32),
                                                   mean32, rstd32, g, w)
    assert_half_matches(dx16, dx32, "dx")
    assert dw16.dtype == np.float32 and db16.dtype == np.float32
    np.testing.assert_allclose(dw16, dw32, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db16, db32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_batch_norm_float16_training_and_inference(fmt):
    rng = np.random.default_rng(17)
    shape = (4, 5, 6, 7)
    x = half_input(shape, rng, fmt, offset=-2.0)
    w = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, 5).astype(np.float32)
    rm16, rv16 = np.zeros(5, np.float32), np.ones(5, np.float32)
    rm32, rv32 = rm16.copy(), rv16.copy()
    y16, sm16, si16 = normkit.batch_norm_forward(x, rm16, rv16, w, b, training=True)
    y32, sm32, si32 = normkit.batch_norm_forward(x.astype(np.float32), rm32, rv32, w, b,
                                                 training=True)
    assert_half_matches(y16, y32, "y (training)")
    np.testing.assert_allclose(rm16, rm32, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv16, rv32, rtol=1e-6)

    y16 = normkit.batch_norm(x, rm16, rv16, w, b, training=False)
    y32 = normkit.batch_norm(x.astype(np.float32), rm32, rv32, w, b, training=False)
    assert_half_matches(y16, y32, "y (inference)")

    dy = half_input(shape, rng, fmt)
    dx16, dw16, db16 = normkit.batch_norm_backward(dy, x, w, sm16, si16)
    dx32, dw32, db32 = normkit.batch_norm_backward(dy.astype(np.float32), x.astype(np.float32),
                                                   w, sm32, si32)
    assert_half_matches(dx16, dx32, "dx")
    np.testing.assert_allclose(dw16, dw32, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db16, db32, rtol=1e-4, atol=1e-4)


def test_instance_norm_float16():
    rng = np.random.default_rng(18)
    x = half_input((2, 3, 9, 10), rng, "channels_first", offset=100.0)
    y16 = normkit.instance_norm(x)
    y32 = normkit.instance_norm(x.astype(np.float32))
    assert_half_matches(y16, y32, "y")


def test_float16_squares_do_not_overflow():
    # 300^2 = 9e4 > 65504, float16's largest value: the statistics must be float32.
    rng = np.random.default_rng(19)
    x = (300.0 + 30.0 * rng.standard_normal((2, 4, 8, 8))).astype(np.float16)
    y = normkit.group_norm(x, 2)
    assert np.all(np.isfinite(y))
    y32 = normkit.group_norm(x.astype(np.float32), 2)
    assert_half_matches(y, y32, "y")


def test_mixed_half_and_single_is_an_error():
    rng = np.random.default_rng(20)
    x = half_input((2, 4, 3), rng, "channels_first")
    y, mean, rstd = normkit.group_norm_forward(x, 2)
    with pytest.raises(ValueError, match="dtype"):
        normkit.group_norm_backward(np.zeros((2, 4, 3), np.float32), x, mean, rstd, 2)


def test_layer_and_instance_norm_backward_float16_match_float32_path():
    """float16 gradients: the float32 path on the same rounded inputs, rounded once."""
    rng = np.random.default_rng(5)
    x16 = (1 + rng.standard_normal((3, 5, 4, 3))).astype(np.float16)
    dy16 = rng.standard_normal(x16.shape).astype(np.float16)
    x32, dy32 = x16.astype(np.float32), dy16.astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal((4, 3))).astype(np.float32)
    _, mean, rstd = normkit.layer_norm_forward(x32, (4, 3), w)
    dx16, dw16, _ = normkit.layer_norm_backward(dy16, x16, (4, 3), mean, rstd, w)
    dx32, dw32, _ = normkit.layer_norm_backward(dy32, x32, (4, 3), mean, rstd, w)
    assert_half_matches(dx16, dx32, "layer_norm dx")
    assert np.allclose(dw16, dw32, rtol=1e-5, atol=1e-5)
    _, mean, rstd = normkit.instance_norm_forward(x32)
    dx16, _, _ = normkit.instance_norm_backward(dy16, x16, mean, rstd)
    dx32, _, _ = normkit.instance_norm_backward(dy32, x32, mean, rstd)
    assert_half_matches(dx16, dx32, "instance_norm dx")
