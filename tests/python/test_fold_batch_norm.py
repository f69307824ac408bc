"""fold_batch_norm against torch's fuse_conv_bn_weights / fuse_linear_bn_weights in float64, and
the folded convolution against convolution then BatchNorm (eval) in float64 on random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

import normkit
from normkit_testing import raises

# One rounding of a float64 value to float32.
ROUNDING = 2.0 ** -24


def f32(rng, shape, loc=0.0, scale=1.0):
    return rng.normal(loc, scale, shape).astype(np.float32)


def bn_state(rng, channels, with_bn_weight=True, with_bn_bias=True):
    mean = f32(rng, channels, 0.2, 1.0)
    var = (rng.uniform(0.0, 2.0, channels) ** 2).astype(np.float32)  # near-zero ones included
    weight = f32(rng, channels, 1.0, 0.5) if with_bn_weight else None
    bias = f32(rng, channels, 0.0, 0.5) if with_bn_bias else None
    return mean, var, weight, bias


def t64(a):
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))


def assert_rounded_from(got, want):
    """got (float32) is want (float64) rounded once."""
    assert got.dtype == np.float32
    want = want.detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), ROUNDING * np.abs(want) * 1.01 + 1e-38)


@pytest.mark.parametrize("optional", range(8))
@pytest.mark.parametrize("kernel", [(), (1,), (3, 3), (5, 3), (3, 1, 3)])
def test_matches_torch_fuse_conv_bn_weights(rng, kernel, optional):
    out_channels, in_channels = int(rng.choice([1, 3, 7, 29])), int(rng.choice([1, 2, 5]))
    weight = f32(rng, (out_channels, in_channels, *kernel), 0.0, 0.3)
    bias = f32(rng, out_channels) if optional & 1 else None
    mean, var, bn_w, bn_b = bn_state(rng, out_channels, optional & 2, optional & 4)
    eps = float(rng.choice([1e-5, 1e-3, 0.0])) if optional != 7 else 1e-5
    got_w, got_b = normkit.fold_batch_norm(weight, bias, mean, var, bn_w, bn_b, eps=eps)
    if kernel == ():
        want_w, want_b = fuse_linear_bn_weights(t64(weight), t64(bias), t64(mean), t64(var),
                                                eps, t64(bn_w) if bn_w is not None
                                                else torch.ones(out_channels),
                                                t64(bn_b) if bn_b is not None
                                                else torch.zeros(out_channels))
    else:
        want_w, want_b = fuse_conv_bn_weights(t64(weight), t64(bias), t64(mean), t64(var), eps,
                                              t64(bn_w), t64(bn_b))
    assert_rounded_from(got_w, want_w)
    assert_rounded_from(got_b, want_b)


@pytest.mark.parametrize("conv", [F.conv1d, F.conv2d, F.conv3d])
@pytest.mark.parametrize("groups", [1, 3])
def test_folded_conv_is_conv_then_eval_batch_norm(rng, conv, groups):
    dims = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[conv]
    in_channels, out_channels = 3 * int(rng.integers(1, 3)), 3 * int(rng.integers(1, 4))
    kernel = tuple(int(k) for k in rng.choice([1, 3, 5], dims))
    weight = f32(rng, (out_channels, in_channels // groups, *kernel), 0.0, 0.3)
    bias = f32(rng, out_channels)
    mean, var, bn_w, bn_b = bn_state(rng, out_channels)
    eps = 1e-5
    x = t64(f32(rng, (2, in_channels, *[int(rng.integers(5, 9)) for _ in range(dims)]), 0.5))
    want = F.batch_norm(conv(x, t64(weight), t64(bias), padding=1, groups=groups), t64(mean),
                        t64(var), t64(bn_w), t64(bn_b), training=False, eps=eps)
    got_w, got_b = normkit.fold_batch_norm(weight, bias, mean, var, bn_w, bn_b, eps=eps)
    got = conv(x, t64(got_w), t64(got_b), padding=1, groups=groups)
    # The folded parameters carry one float32 rounding each; the sums grow it with their size.
    magnitude = conv(x.abs(), t64(np.abs(got_w)), t64(np.abs(got_b)), padding=1, groups=groups)
    assert torch.all((got - want).abs() <= 4 * ROUNDING * magnitude + 1e-12)


def test_linear_and_strided_weight(rng):
    weight = f32(rng, (9, 13)).T  # (13, 9), not contiguous: copied first
    mean, var, bn_w, bn_b = bn_state(rng, 13)
    got_w, got_b = normkit.fold_batch_norm(weight, None, mean, var, bn_w, bn_b)
    want_w, want_b = fuse_linear_bn_weights(t64(weight), torch.zeros(13), t64(mean), t64(var),
                                            1e-5, t64(bn_w), t64(bn_b))
    assert got_w.flags.c_contiguous
    assert_rounded_from(got_w, want_w)
    assert_rounded_from(got_b, want_b)


def test_empty_layers(rng):
    w, b = normkit.fold_batch_norm(np.zeros((0, 3, 3, 3), np.float32), None,
                                   np.zeros(0, np.float32), np.ones(0, np.float32), None, None)
    assert w.shape == (0, 3, 3, 3) and b.shape == (0,)
    mean, var, bn_w, bn_b = bn_state(rng, 4)
    w, b = normkit.fold_batch_norm(np.zeros((4, 0), np.float32), None, mean, var, bn_w, bn_b)
    assert w.shape == (4, 0)
    assert_rounded_from(b, fuse_linear_bn_weights(torch.zeros(4, 0), torch.zeros(4), t64(mean),
                                                   t64(var), 1e-5, t64(bn_w), t64(bn_b))[1])


def test_rejects_bad_arguments(rng):
    weight = f32(rng, (4, 2, 3, 3))
    bias = f32(rng, 4)
    mean, var, bn_w, bn_b = bn_state(rng, 4)
    short = np.ones(3, np.float32)
    fold = normkit.fold_batch_norm
    with raises(ValueError, "fold_batch_norm", "conv_bias has length 3", "out_channels = 4"):
        fold(weight, short, mean, var, bn_w, bn_b)
    with raises(ValueError, "running_mean has length 3"):
        fold(weight, bias, short, var, bn_w, bn_b)
    with raises(ValueError, "running_var has length 3"):
        fold(weight, bias, mean, short, bn_w, bn_b)
    with raises(ValueError, "bn_weight has length 3"):
        fold(weight, bias, mean, var, short, bn_b)
    with raises(ValueError, "bn_bias has length 3"):
        fold(weight, bias, mean, var, bn_w, short)
    with raises(ValueError, "eps must be finite and >= 0, got -0.001"):
        fold(weight, bias, mean, var, bn_w, bn_b, eps=-1e-3)
    with raises(ValueError, "eps must be finite and >= 0, got nan"):
        fold(weight, bias, mean, var, bn_w, bn_b, eps=float("nan"))
    bad = var.copy()
    bad[1] = -0.5
    with raises(ValueError, "running_var[1] = -0.5, expected >= 0"):
        fold(weight, bias, mean, bad, bn_w, bn_b)
    bad[1] = np.nan
    with raises(ValueError, "running_var[1] = nan"):
        fold(weight, bias, mean, bad, bn_w, bn_b)
    with raises(ValueError, "conv_weight must have shape (C_out, ...)"):
        fold(np.array(1.0, np.float32), bias, mean, var, bn_w, bn_b)
    with raises(ValueError, "running_mean must be 1-D"):
        fold(weight, bias, mean.reshape(2, 2), var, bn_w, bn_b)
    with raises(TypeError, "conv_weight has dtype float64, expected float32"):
        fold(weight.astype(np.float64), bias, mean, var, bn_w, bn_b)


def test_torch_tensors_give_torch_tensors(rng):
    weight = f32(rng, (5, 3, 3, 3))
    mean, var, bn_w, bn_b = bn_state(rng, 5)
    got_w, got_b = normkit.fold_batch_norm(*(torch.from_numpy(a) for a in
                                             (weight, f32(rng, 5), mean, var, bn_w, bn_b)))
    assert isinstance(got_w, torch.Tensor) and isinstance(got_b, torch.Tensor)
    assert got_w.dtype == torch.float32 and got_w.shape == (5, 3, 3, 3)
